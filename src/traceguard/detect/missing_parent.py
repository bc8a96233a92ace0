"""``missing_parent``: a span's parent never arrived (an orphan).

One finding per missing parent, named after its first orphan: a lost span
with five children is one problem, not five. In a rootless trace the missing
root's children belong to ``missing_root`` instead.
"""

from __future__ import annotations

from traceguard.detect.base import finding, top_orphan
from traceguard.records import Anomaly, AnomalyKind, Span, Trace


class MissingParent:
    kind = AnomalyKind.MISSING_PARENT

    def detect(self, trace: Trace) -> list[Anomaly]:
        groups: dict[bytes, list[Span]] = {}
        for span in trace.orphans:
            groups.setdefault(span.parent_span_id, []).append(span)
        top = top_orphan(trace)
        if top is not None:
            groups.pop(top.parent_span_id, None)
        findings = []
        for parent_id, spans in groups.items():
            first = min(spans, key=lambda s: (s.start, s.span_id))
            findings.append(finding(
                self.kind, trace.trace_id, first,
                detected_at=trace.decided_at,
                event_time=first.start,
                severity="warning",
                score=1.0,
                summary=(
                    f"{first.service} '{first.name}' and {len(spans) - 1} sibling(s) lost their parent span "
                    f"{parent_id.hex()}: it was dropped or never ended."
                ),
                evidence={
                    "missing_parent_span_id": parent_id.hex(),
                    "orphan_span_ids": [s.span_id.hex() for s in spans[:10]],
                    "orphan_count": len(spans),
                    "decision": trace.reason,
                },
            ))
        return findings
