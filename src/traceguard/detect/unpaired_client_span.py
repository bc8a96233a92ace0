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
from traceguard.detect.base import answered, finding
from traceguard.records import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, Anomaly, AnomalyKind, Span, Trace

_UNINSTRUMENTED_PEER = frozenset({"db.system", "db.system.name", "messaging.system"})


class _Stage:
    """Pairing history of one client stage (service, operation)."""

    __slots__ = ("seen", "paired", "uninstrumented_peer")

    def __init__(self, uninstrumented_peer: bool, seen: int = 0, paired: int = 0) -> None:
        self.seen = seen
        self.paired = paired
        self.uninstrumented_peer = uninstrumented_peer

    @classmethod
    def of(cls, span: Span) -> "_Stage":
        # Kept attributes are a stage fact (decode.common.StageAttributes).
        return cls(any(key in _UNINSTRUMENTED_PEER for key, _ in span.attrs or ()))


class UnpairedClientSpan:
    kind = AnomalyKind.UNPAIRED_CLIENT_SPAN

    def __init__(self, config: StructuralConfig) -> None:
        self._config = config
        self.stages_: dict[tuple[str, str], _Stage] = {}

    def detect(self, trace: Trace) -> list[Anomaly]:
        findings = []
        config = self._config
        stages = self.stages_
        children = trace.children
        for span in trace.spans:
            if span.kind != KIND_CLIENT:
                continue
            key = (span.service, span.name)
            stage = stages.get(key)
            if stage is None:
                stage = _Stage.of(span)
                if len(stages) < config.unpaired_max_stages:
                    stages[key] = stage
            if stage.uninstrumented_peer or (span.status == STATUS_ERROR and not answered(span)):
                continue
            paired = False
            for child in children.get(span.span_id, ()):
                if child.kind == KIND_SERVER:
                    paired = True
                    break
            if not paired and stage.seen >= config.unpaired_min_samples:
                ratio = stage.paired / stage.seen
                if ratio >= config.unpaired_min_ratio:
                    findings.append(self._finding(trace, span, stage.seen, ratio))
            stage.seen += 1
            stage.paired += paired
            if stage.seen > config.unpaired_window:
                stage.seen //= 2
                stage.paired //= 2
        return findings

    def state(self) -> list[list]:
        """The pairing history, so a restarted stream processor judges as it did before."""
        return [[service, name, stage.seen, stage.paired, stage.uninstrumented_peer]
                for (service, name), stage in self.stages_.items()]

    def restore(self, state: list[list]) -> None:
        for service, name, seen, paired, uninstrumented in state[: self._config.unpaired_max_stages]:
            self.stages_[(str(service), str(name))] = _Stage(bool(uninstrumented), int(seen), int(paired))

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
