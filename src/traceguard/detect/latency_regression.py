"""``latency_regression``: a stage's self time shifted against its baseline and stayed shifted.

Stage-level: no trace id, exemplar traces instead (their logs are linked).
When latency returns, the same finding (same id) is emitted again with
``evidence.state = "resolved"``; sinks that upsert by id close it.

A stage that several pods serve is also judged per pod (``PodLatency``): one
pod slower than its own history while its peers are not is a finding of the
stage with ``evidence.instance`` naming the pod (and its own id).
"""

from __future__ import annotations

import math

from traceguard.detect.base import stage_finding, times, utc
from traceguard.models.features import latency_keys, latency_samples, network_parts
from traceguard.models.latency import LatencyModel, PodLatency, Regression
from traceguard.models.series import StageSeries
from traceguard.records import KIND_NAMES, Anomaly, AnomalyKind, Trace


class LatencyRegression:
    kind = AnomalyKind.LATENCY_REGRESSION

    def __init__(self, model: LatencyModel, pods: PodLatency | None = None, series: StageSeries | None = None) -> None:
        self.model = model
        self.pods = pods
        if series is not None:
            model.on_window = series.latency

    def detect(self, trace: Trace) -> list[Anomaly]:
        events: list[Regression] = []
        now = trace.decided_at
        self.model.observe(latency_keys(trace), trace.spans, latency_samples(trace), trace.trace_id.hex(), now, events)
        if self.pods is not None:
            self.pods.observe(trace, now, events)
        return [self._anomaly(event, now) for event in events]

    def advance(self, now: int) -> list[Anomaly]:
        events: list[Regression] = []
        self.model.advance(now, events)
        if self.pods is not None:
            self.pods.advance(now, events)
        return [self._anomaly(event, now) for event in events]

    def flush(self, now: int) -> list[Anomaly]:
        events: list[Regression] = []
        self.model.flush(events)
        if self.pods is not None:
            self.pods.flush(events)
        return [self._anomaly(event, now) for event in events]

    def _anomaly(self, regression: Regression, now: int) -> Anomaly:
        service, operation, span_kind = regression.stage[:3]
        pod = regression.stage[3] if len(regression.stage) > 3 else None
        resolved = regression.resolved_at is not None
        onset = utc(regression.onset)
        base, current = regression.baseline, regression.current
        network = network_parts(regression.stage)
        what = (f"the network from {network[1]} into {service} '{network[0]}'"
                if network is not None else f"{service} '{operation}' self time")
        if pod is not None:
            what += f" on pod {pod}"
        summary = (
            f"{what} {'was' if resolved else 'is'} {times(regression.magnitude)} its baseline "
            f"since {onset} (p50 {base['p50_ms']} → {current['p50_ms']} ms, p99 {base['p99_ms']} → {current['p99_ms']} ms)"
            + ("; it is back to normal." if resolved else ".")
        )
        return stage_finding(
            self.kind, regression.stage[:3], str(regression.onset) if pod is None else f"{regression.onset}|{pod}",
            detected_at=now,
            event_time=regression.onset,
            severity="critical" if regression.magnitude >= 2 else "warning",
            score=min(1.0, math.log(regression.magnitude) / math.log(4)),
            summary=summary,
            evidence={
                "state": "resolved" if resolved else "open",
                "signal": "latency",
                "metric": "network_time" if network is not None else "self_time",
                "stage_kind": KIND_NAMES[span_kind],
                "onset_unix_nano": regression.onset,
                "opened_at_unix_nano": regression.opened_at,
                "resolved_at_unix_nano": regression.resolved_at,
                "magnitude": regression.magnitude,
                "windows": regression.windows,
                "baseline": base,
                "current": current,
                "baseline_total": regression.baseline_total,
                "current_total": regression.current_total,
                **({"instance": pod} if pod is not None else {}),
            },
            exemplars=regression.exemplars,
        )
