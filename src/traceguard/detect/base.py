"""The detector contract and the one way a finding is built.

A ``TraceDetector`` looks at one decided trace and returns findings; it never
learns where spans came from nor where findings go. ``finding`` gives every
anomaly its deterministic id (same input, same id), which is what makes
re-delivery and replay harmless for idempotent sinks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from typing import TYPE_CHECKING, Any, Protocol

from traceguard.decode.common import GRPC_STATUS_CODE, PER_CALL_ATTRIBUTES, response_code
from traceguard.records import KIND_NAMES, Anomaly, AnomalyKind, Span, Trace

if TYPE_CHECKING:
    from traceguard.models.rates import RateChange


class TraceDetector(Protocol):
    kind: AnomalyKind

    def detect(self, trace: Trace) -> list[Anomaly]:
        """Findings of this detector's kind in one decided trace."""


class WindowedDetector(TraceDetector, Protocol):
    """A detector that also finds things later: a window closing, a batch scored."""

    def advance(self, now: int) -> list[Anomaly]:
        """Findings that became due at ``now`` (pipeline clock)."""

    def flush(self, now: int) -> list[Anomaly]:
        """End of input: everything still pending."""


class LearnedDetector(WindowedDetector, Protocol):
    """A detector that learns from each decided trace after detection. (Those
    that learn by window, from what ``detect`` counted, are only windowed.)"""

    def learn(self, trace: Trace, flagged: frozenset[AnomalyKind]) -> None:
        """Every decided trace, after detection; ``flagged``: the kinds found in it.

        Each model chooses what it learns from. Frequencies must be learned from
        flagged traces too, or a behaviour that is flagged but routine is flagged
        for ever (a feedback loop); what a model keeps out is only what its own
        evidence calls extreme, and traces whose spans did not all arrive intact."""


# gRPC codes a client sets itself when no server answered (no connection, no answer in time)
_GRPC_NO_ANSWER = frozenset({4, 14})


def answered(span: Span) -> bool:
    """Whether a server answered this call: an HTTP status, or a gRPC status other
    than UNAVAILABLE / DEADLINE_EXCEEDED, came back (the kept per-call attributes
    of an error span; see ``decode.common.StageAttributes``)."""
    return any(key in PER_CALL_ATTRIBUTES and (key != GRPC_STATUS_CODE or response_code(value) not in _GRPC_NO_ANSWER)
               for key, value in span.attrs or ())


def anomaly_id(kind: AnomalyKind, *parts: str) -> str:
    digest = hashlib.sha256("|".join((kind.value, *parts)).encode()).hexdigest()
    return digest[:32]


def finding(kind: AnomalyKind, trace_id: bytes, span: Span, stage: tuple[str, str, int] | None = None,
            **details: Any) -> Anomaly:
    """A trace-level finding about ``span``; one per (kind, trace, span). Its
    service and operation are the span's, or ``stage``'s when the finding is
    about a stage the span measures (a network path into another service).

    ``details``: detected_at, event_time, severity, score, summary, evidence.
    """
    trace_hex, span_hex = trace_id.hex(), span.span_id.hex()
    service, operation = (stage[0], stage[1]) if stage is not None else (span.service, span.name)
    return _anomaly(anomaly_id(kind, trace_hex, span_hex), kind, trace_hex, span_hex, service, operation, details)


def stage_finding(kind: AnomalyKind, stage: tuple[str, str, int], key: str, **details: Any) -> Anomaly:
    """A stage-level finding (no trace, exemplars instead); ``key`` tells one
    episode of the stage from another."""
    service, operation, span_kind = stage
    return _anomaly(anomaly_id(kind, service, operation, str(span_kind), key), kind, None, None, service, operation,
                    details)


def utc(nanos: int) -> str:
    return dt.datetime.fromtimestamp(nanos / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def rate_change_finding(kind: AnomalyKind, change: "RateChange", now: int, *, signal: str, what: str,
                        evidence: dict[str, Any] | None = None) -> Anomaly:
    """The stage-level finding of a rate that changed (``models.rates``): opened,
    updated and resolved under one id. ``evidence.signal`` names what changed,
    for the incident tracker; the stage is the first three parts of the key."""
    stage = change.key[:3]
    resolved = change.resolved_at is not None
    rose = change.current_rate > change.baseline_rate
    summary = (
        f"{what} {'rose' if rose else 'fell'} from {change.baseline_rate:.2%} (norm over {change.baseline_calls} "
        f"calls) to {change.current_rate:.2%} ({change.current_hits} of {change.current_calls}) since "
        f"{utc(change.onset)}" + ("; it is back to normal." if resolved else ".")
    )
    return stage_finding(
        kind, stage, f"{signal}|{'|'.join(map(str, change.key[3:]))}|{change.onset}",
        detected_at=now,
        event_time=change.onset,
        severity="critical" if change.magnitude >= 10 else "warning",
        score=min(1.0, math.log(change.magnitude) / math.log(100)),
        summary=summary,
        evidence={
            "state": "resolved" if resolved else "open",
            "signal": signal,
            "stage_kind": KIND_NAMES[stage[2]],
            "onset_unix_nano": change.onset,
            "opened_at_unix_nano": change.opened_at,
            "resolved_at_unix_nano": change.resolved_at,
            "magnitude": change.magnitude,
            "baseline_rate": change.baseline_rate,
            "baseline_calls": change.baseline_calls,
            "current_rate": change.current_rate,
            "current_calls": change.current_calls,
            **(evidence or {}),
        },
        exemplars=change.exemplars,
    )


def _anomaly(id_: str, kind: AnomalyKind, trace_hex: str | None, span_hex: str | None, service: str,
             operation: str, details: dict[str, Any]) -> Anomaly:
    return Anomaly(id=id_, kind=kind, trace_id=trace_hex, span_id=span_hex, service=service, operation=operation,
                   **{**details, "score": round(details["score"], 4)})


def top_orphan(trace: Trace) -> Span | None:
    """For a rootless trace, the orphan that most likely hung off the missing root.

    The span that started first is the outermost one we have; its missing
    parent is taken to be the root, so the root's other children are evidence
    of one ``missing_root`` and not each a ``missing_parent``.
    """
    if trace.root is not None:
        return None
    candidates = trace.orphans or trace.spans
    return min(candidates, key=lambda s: (s.start, s.span_id)) if candidates else None


def ms(nanos: int) -> float:
    return round(nanos / 1e6, 3)


def duration(nanos: int) -> str:
    """A duration as a person reads it: "850 µs", "27.5 ms", "42.8 s", "3.2 min", "1.5 h"."""
    for unit, size in (("h", 3600e9), ("min", 60e9), ("s", 1e9), ("ms", 1e6)):
        if abs(nanos) >= size:
            return f"{nanos / size:.3g} {unit}"
    return f"{nanos / 1e3:.3g} µs"


def times(ratio: float) -> str:
    """A ratio as a person reads it: "1.32x", "48x", and past 1000 "over 1000x" (a
    baseline near the clock's resolution makes any ratio meaningless)."""
    return "over 1000x" if ratio > 1000 else f"{ratio:.3g}x"
