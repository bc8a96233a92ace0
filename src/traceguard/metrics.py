"""Process counters and gauges, named as they will be exported to Prometheus.

Every bound that drops or evicts something counts it here, so nothing is lost
silently. Stages hold a ``Metrics`` passed in at construction.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]


# Upper bounds (seconds) of the latency histograms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[LabelKey, int]] = defaultdict(lambda: defaultdict(int))
        self._gauges: dict[str, Callable[[], float]] = {}
        self._histograms: dict[str, list] = {}  # name → [bucket counts..., sum]
        self._lock = threading.Lock()

    def observe(self, name: str, seconds: float) -> None:
        """One sample of a latency histogram."""
        self.observe_many(name, (seconds,))

    def observe_many(self, name: str, samples: Iterable[float]) -> None:
        """Samples of a latency histogram, under one lock (a batch of decisions)."""
        bucket = bisect.bisect_left
        with self._lock:
            histogram = self._histograms.get(name)
            if histogram is None:
                histogram = self._histograms[name] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
            for seconds in samples:
                histogram[bucket(LATENCY_BUCKETS, seconds)] += 1
                histogram[-1] += seconds

    def histograms(self) -> dict[str, list]:
        with self._lock:
            return {name: list(values) for name, values in self._histograms.items()}

    def inc(self, name: str, value: int = 1, **labels: str) -> None:
        self._counters[name][tuple(sorted(labels.items())) if labels else ()] += value

    def counter(self, name: str, **labels: str) -> Callable[..., None]:
        """``inc`` of one labelled series with its key built once, for per-trace paths."""
        key = tuple(sorted(labels.items()))
        counters = self._counters

        def inc(value: int = 1) -> None:
            counters[name][key] += value
        return inc

    def counters(self) -> dict[str, dict[LabelKey, int]]:
        return {name: dict(series) for name, series in list(self._counters.items())}

    def gauges(self) -> dict[str, float]:
        return {name: read() for name, read in list(self._gauges.items())}

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


def prometheus_text(metrics: Metrics) -> bytes:
    """The metrics in the Prometheus text exposition format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class _Collector:
        def collect(self):
            for name, series in sorted(metrics.counters().items()):
                label_names = sorted({k for key in series for k, _ in key})
                family = CounterMetricFamily(name.removesuffix("_total"), name, labels=label_names)
                for key, value in series.items():
                    values = dict(key)
                    family.add_metric([values.get(label, "") for label in label_names], value)
                yield family
            for name, value in sorted(metrics.gauges().items()):
                yield GaugeMetricFamily(name, name, value=value)
            for name, values in sorted(metrics.histograms().items()):
                cumulative, buckets = 0, []
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), values[:-1]):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                yield HistogramMetricFamily(name, name, buckets=buckets, sum_value=values[-1])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)
