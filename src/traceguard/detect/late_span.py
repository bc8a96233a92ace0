"""``late_span``: a span arrived for a trace that had already been decided.

Its trace's findings were computed without it, so it is reported on its own;
it is not a new trace.
"""

from __future__ import annotations

from traceguard.detect.base import duration, finding
from traceguard.records import Anomaly, AnomalyKind, Span


class LateSpan:
    kind = AnomalyKind.LATE_SPAN

    def detect_late(self, trace_id: bytes, span: Span, decided_at: int, detected_at: int) -> Anomaly:
        event_time = span.end if span.finished else span.start
        return finding(
            self.kind, trace_id, span,
            detected_at=detected_at,
            event_time=event_time,
            severity="info",
            score=1.0,
            summary=(
                f"{span.service} '{span.name}' arrived after its trace was decided "
                f"(it {'ended' if span.finished else 'started'} {duration(abs(decided_at - event_time))} "
                f"{'before' if event_time <= decided_at else 'after'} the decision); "
                "the trace's findings did not include it."
            ),
            evidence={
                "trace_decided_at": decided_at,
                "span_event_time": event_time,
                "parent_span_id": span.parent_span_id.hex() if span.parent_span_id else None,
            },
        )
