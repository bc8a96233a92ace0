"""``unpaired_client_span``: a CLIENT span whose callee's SERVER span never arrived.

Not every client call has a server span: databases, external APIs and SMTP
are not instrumented, and a call that failed before reaching the server has
no callee at all. So a call is only expected to pair when (1) it is not a
database or messaging call by its semantic attributes, (2) it did not fail
without a response status, and (3) this client stage has paired in at least
``unpaired_min_ratio`` of its last calls, over ``unpaired_min_samples``.
"""

from __future__ import annotations

from traceguard.config import StructuralConfig
from traceguard.detect.base import finding
from traceguard.records import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, Anomaly, AnomalyKind, Span, Trace

_UNINSTRUMENTED_PEER = ("db.system", "db.system.name", "messaging.system")
_RESPONSE_STATUS = ("http.response.status_code", "http.status_code")


def _never_reached_server(span: Span) -> bool:
    return span.status == STATUS_ERROR and all(span.attr(key) is None for key in _RESPONSE_STATUS)


class UnpairedClientSpan:
    kind = AnomalyKind.UNPAIRED_CLIENT_SPAN

    def __init__(self, config: StructuralConfig) -> None:
        self._config = config
        # (service, operation) → [calls seen, calls with a server span]
        self.pairing_: dict[tuple[str, str], list[int]] = {}

    def detect(self, trace: Trace) -> list[Anomaly]:
        findings = []
        for span in trace.spans:
            if span.kind != KIND_CLIENT:
                continue
            if any(span.attr(key) is not None for key in _UNINSTRUMENTED_PEER) or _never_reached_server(span):
                continue
            paired = any(child.kind == KIND_SERVER for child in trace.children.get(span.span_id, ()))
            counts = self.pairing_.setdefault((span.service, span.name), [0, 0])
            seen, with_server = counts
            if not paired and seen >= self._config.unpaired_min_samples:
                ratio = with_server / seen
                if ratio >= self._config.unpaired_min_ratio:
                    findings.append(self._finding(trace, span, seen, ratio))
            counts[0] += 1
            counts[1] += paired
            if counts[0] > self._config.unpaired_window:
                counts[0] //= 2
                counts[1] //= 2
        return findings

    def _finding(self, trace: Trace, span: Span, seen: int, ratio: float) -> Anomaly:
        peer = span.attr("peer.service") or span.attr("server.address")
        return finding(
            self.kind, trace.trace_id, span,
            detected_at=trace.decided_at,
            event_time=span.end if span.finished else span.start,
            severity="warning",
            score=ratio,
            summary=(
                f"{span.service} '{span.name}' called {peer or 'its peer'} but the callee's server span never "
                f"arrived (this call had one in {ratio:.0%} of {seen} earlier calls): spans were dropped."
            ),
            evidence={
                "peer": peer,
                "pairing_ratio": round(ratio, 4),
                "calls_seen": seen,
                "status": span.status,
                "decision": trace.reason,
            },
        )
