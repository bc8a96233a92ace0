"""Learned trace structure: which stages appear in the normal traces of a root operation.

Root operation = (root service, root span name). For each, the number of
normal traces and, per stage, in how many of them it appeared. Optional
branches (cache hits that skip the database, retries) have a presence well
below ``min_presence`` and are never expected.
"""

from __future__ import annotations

from traceguard.config import StructureConfig
from traceguard.models.features import Stage, stages
from traceguard.records import Trace

RootOperation = tuple[str, str]
# Counts are halved past this many traces, so presence follows change.
_WINDOW = 20_000


class RootStructure:
    __slots__ = ("traces", "stages")

    def __init__(self) -> None:
        self.traces = 0
        self.stages: dict[Stage, int] = {}


class StructureModel:
    def __init__(self, config: StructureConfig) -> None:
        self.config = config
        self.roots_: dict[RootOperation, RootStructure] = {}

    @staticmethod
    def root_operation(trace: Trace) -> RootOperation | None:
        root = trace.root
        return (root.service, root.name) if root is not None else None

    def learn(self, trace: Trace) -> None:
        key = self.root_operation(trace)
        if key is None:
            return
        structure = self.roots_.get(key)
        if structure is None:
            if len(self.roots_) >= self.config.max_root_operations:
                return
            structure = self.roots_[key] = RootStructure()
        structure.traces += 1
        counts = structure.stages
        for stage in dict.fromkeys(stages(trace)):  # ordered: output is deterministic
            if stage in counts:
                counts[stage] += 1
            elif len(counts) < self.config.max_stages_per_root:
                counts[stage] = 1
        if structure.traces > _WINDOW:
            structure.traces //= 2
            for stage in counts:
                counts[stage] //= 2

    def missing(self, trace: Trace) -> tuple[RootStructure | None, list[tuple[Stage, float]]]:
        """Expected stages absent from ``trace``, with their presence ratio."""
        key = self.root_operation(trace)
        structure = self.roots_.get(key) if key else None
        if structure is None or structure.traces < self.config.min_traces:
            return structure, []
        present = set(stages(trace))
        need = self.config.min_presence * structure.traces
        return structure, [
            (stage, count / structure.traces)
            for stage, count in structure.stages.items()
            if count >= need and stage not in present
        ]
