"""Each stage's recent windows for its page in the web view: self-time p50 and
p95 per latency window, calls and own failures per error window.

Not learned state and not saved: a view of what the detectors saw, kept as
they close their windows (a few numbers per stage and window, no per-span
work). Bounded: ``ui.series_windows`` windows per stage, ``ui.series_stages``
stages (the first seen; the rest are counted in ``untracked_``).
"""

from __future__ import annotations

from collections import deque

from traceguard.records import KIND_NAMES

Stage = tuple[str, str, int]


class StageSeries:
    def __init__(self, windows: int, max_stages: int) -> None:
        self._windows, self._max_stages = windows, max_stages
        self._latency: dict[Stage, deque] = {}
        self._errors: dict[Stage, deque] = {}
        self.untracked_ = 0

    def clear(self) -> None:
        """Starts again (a group's judge that takes over shows what it judges from then)."""
        self._latency, self._errors = {}, {}

    def _series(self, table: dict[Stage, deque], stage: Stage) -> deque | None:
        series = table.get(stage)
        if series is None:
            if len(table) >= self._max_stages:
                self.untracked_ += 1
                return None
            series = table[stage] = deque(maxlen=self._windows)
        return series

    def latency(self, stage: Stage, start: int, samples: int, p50_ns: float, p95_ns: float) -> None:
        series = self._series(self._latency, stage)
        if series is not None:
            series.append((start, samples, round(p50_ns), round(p95_ns)))

    def errors(self, stage: Stage, start: int, calls: int, failed: int) -> None:
        series = self._series(self._errors, stage)
        if series is not None:
            series.append((start, calls, failed))

    def of(self, service: str, operation: str) -> list[dict]:
        """The stage's series, one entry per span kind it was seen with (JSON-ready).
        Read from the API's thread while the pipeline appends: ``list`` copies a
        deque whole under the GIL."""
        stages = {key for table in (self._latency, self._errors) for key in list(table)
                  if key[0] == service and key[1] == operation}
        return [{
            "service": service, "operation": operation, "span_kind": KIND_NAMES[kind],
            "latency": [{"start": s, "samples": n, "p50_ns": p50, "p95_ns": p95}
                        for s, n, p50, p95 in list(self._latency.get((service, operation, kind), ()))],
            "errors": [{"start": s, "calls": c, "failed": f}
                       for s, c, f in list(self._errors.get((service, operation, kind), ()))],
        } for _, _, kind in sorted(stages)]
