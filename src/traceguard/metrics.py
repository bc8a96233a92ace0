"""Process counters and gauges, named as they will be exported to Prometheus.

Every bound that drops or evicts something counts it here, so nothing is lost
silently. Stages hold a ``Metrics`` passed in at construction.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

LabelKey = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[LabelKey, int]] = defaultdict(lambda: defaultdict(int))
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, value: int = 1, **labels: str) -> None:
        self._counters[name][tuple(sorted(labels.items()))] += value

    def get(self, name: str, **labels: str) -> int:
        """A counter's value for exactly these labels (all labels summed if none given)."""
        series = self._counters.get(name, {})
        if labels:
            return series.get(tuple(sorted(labels.items())), 0)
        return sum(series.values())

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, series in sorted(self._counters.items()):
            if len(series) == 1 and () in series:
                out[name] = series[()]
            else:
                out[name] = {",".join(f"{k}={v}" for k, v in key): n for key, n in sorted(series.items())}
        for name, read in sorted(self._gauges.items()):
            out[name] = read()
        return out
