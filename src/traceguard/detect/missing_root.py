"""``missing_root``: spans of a trace arrived but its root never did."""

from __future__ import annotations

from traceguard.detect.base import finding, ms, top_orphan
from traceguard.records import Anomaly, AnomalyKind, Trace


class MissingRoot:
    kind = AnomalyKind.MISSING_ROOT

    def detect(self, trace: Trace) -> list[Anomaly]:
        top = top_orphan(trace)
        if top is None:
            return []
        waiting = [s.span_id.hex() for s in trace.orphans if s.parent_span_id == top.parent_span_id]
        missing = top.parent_span_id.hex() if top.parent_span_id else None
        return [finding(
            self.kind, trace.trace_id, top,
            detected_at=trace.decided_at,
            event_time=top.start,
            severity="critical",
            score=1.0,
            summary=(
                f"The request never finished: {len(trace.spans)} spans arrived but the root did not; "
                f"the outermost span {top.service} '{top.name}' waits on parent {missing}."
            ),
            evidence={
                "missing_root_span_id": missing,
                "children_of_missing_root": waiting[:10],
                "span_count": len(trace.spans),
                "services": sorted({s.service for s in trace.spans}),
                "decision": trace.reason,
                "waited_ms": ms(trace.decided_at - trace.first_seen),
            },
        )]
