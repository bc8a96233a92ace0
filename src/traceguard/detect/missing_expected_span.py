"""``missing_expected_span``: a stage (almost) every normal trace of this root operation has is absent.

One finding per trace, on its root span, listing every absent stage. Only
traces that raised no finding at all teach the model what normal looks like.
"""

from __future__ import annotations

from traceguard.detect.base import finding
from traceguard.models.structure import StructureModel
from traceguard.records import KIND_NAMES, Anomaly, AnomalyKind, Trace


class MissingExpectedSpan:
    kind = AnomalyKind.MISSING_EXPECTED_SPAN

    def __init__(self, model: StructureModel) -> None:
        self.model = model

    def detect(self, trace: Trace) -> list[Anomaly]:
        structure, missing = self.model.missing(trace)
        if not missing:
            return []
        root = trace.root
        names = ", ".join(f"{service} '{operation}'" for (service, operation, _), _ in missing[:5])
        return [finding(
            self.kind, trace.trace_id, root,
            detected_at=trace.decided_at,
            event_time=root.start,
            severity="warning",
            score=min(presence for _, presence in missing),
            summary=(
                f"{root.service} '{root.name}' ran without {names}, "
                f"which {'appears' if len(missing) == 1 else 'appear'} in nearly every normal trace of it."
            ),
            evidence={
                "missing_stages": [
                    {"service": service, "operation": operation, "kind": KIND_NAMES[kind], "presence": round(presence, 4)}
                    for (service, operation, kind), presence in missing
                ],
                "normal_traces": structure.traces,
            },
        )]

    def learn(self, trace: Trace) -> None:
        self.model.learn(trace)

    def advance(self, now: int) -> list[Anomaly]:
        return []

    def flush(self, now: int) -> list[Anomaly]:
        return []
