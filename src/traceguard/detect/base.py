"""The detector contract and the one way a finding is built.

A ``TraceDetector`` looks at one decided trace and returns findings; it never
learns where spans came from nor where findings go. ``finding`` gives every
anomaly its deterministic id (same input, same id), which is what makes
re-delivery and replay harmless for idempotent sinks.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from traceguard.records import Anomaly, AnomalyKind, Severity, Span, Trace


class TraceDetector(Protocol):
    kind: AnomalyKind

    def detect(self, trace: Trace) -> list[Anomaly]:
        """Findings of this detector's kind in one decided trace."""


class LearnedDetector(TraceDetector, Protocol):
    """A detector with learned state. Besides ``detect`` it may find things
    later (a window closing, a batch scored) and it learns only from traces
    that no detector flagged."""

    def learn(self, trace: Trace) -> None:
        """``trace`` raised no finding at all: it may shape the model."""

    def advance(self, now: int) -> list[Anomaly]:
        """Findings that became due at ``now`` (pipeline clock)."""

    def flush(self, now: int) -> list[Anomaly]:
        """End of input: everything still pending."""


def anomaly_id(kind: AnomalyKind, *parts: str) -> str:
    digest = hashlib.sha256("|".join((kind.value, *parts)).encode()).hexdigest()
    return digest[:32]


def finding(
    kind: AnomalyKind,
    trace_id: bytes,
    span: Span,
    *,
    detected_at: int,
    event_time: int,
    severity: Severity,
    score: float,
    summary: str,
    evidence: dict[str, Any],
) -> Anomaly:
    """A trace-level finding about ``span``; one per (kind, trace, span)."""
    trace_hex = trace_id.hex()
    span_hex = span.span_id.hex()
    return Anomaly(
        id=anomaly_id(kind, trace_hex, span_hex),
        kind=kind,
        trace_id=trace_hex,
        span_id=span_hex,
        service=span.service,
        operation=span.name,
        event_time=event_time,
        detected_at=detected_at,
        severity=severity,
        score=round(score, 4),
        summary=summary,
        evidence=evidence,
    )


def stage_finding(
    kind: AnomalyKind,
    stage: tuple[str, str, int],
    key: str,
    *,
    detected_at: int,
    event_time: int,
    severity: Severity,
    score: float,
    summary: str,
    evidence: dict[str, Any],
    exemplars: list[str],
) -> Anomaly:
    """A stage-level finding (no trace); ``key`` tells one episode of the stage from another."""
    service, operation, span_kind = stage
    return Anomaly(
        id=anomaly_id(kind, service, operation, str(span_kind), key),
        kind=kind,
        trace_id=None,
        span_id=None,
        service=service,
        operation=operation,
        event_time=event_time,
        detected_at=detected_at,
        severity=severity,
        score=round(score, 4),
        summary=summary,
        evidence=evidence,
        exemplars=exemplars,
    )


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
