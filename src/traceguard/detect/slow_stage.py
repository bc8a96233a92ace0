"""``slow_stage``: one span's self time far outside its stage's baseline.

Robust in log space: beyond median + ``slow_stage_z`` robust sigmas and
beyond the baseline p99 by ``slow_stage_min_excess``. A stage with an open
regression is left to the regression. At most ``slow_stage_max_per_trace``
per trace, the furthest out first.
"""

from __future__ import annotations

import math

from traceguard.config import LatencyConfig
from traceguard.detect.base import finding, ms
from traceguard.models.features import latency_keys, latency_samples, network_parts
from traceguard.models.latency import LatencyModel, beyond_slow_threshold
from traceguard.native import in_c
from traceguard.records import KIND_NAMES, Anomaly, AnomalyKind, Trace


class SlowStage:
    kind = AnomalyKind.SLOW_STAGE

    def __init__(self, model: LatencyModel, config: LatencyConfig) -> None:
        self.model = model
        self._max = config.slow_stage_max_per_trace
        self._min_samples = config.slow_stage_min_samples

    def detect(self, trace: Trace) -> list[Anomaly]:
        baselines = self.model.stages_
        keys, spans, samples = latency_keys(trace), trace.spans, latency_samples(trace)
        slow = []
        for i in in_c("beyond_slow_threshold", beyond_slow_threshold, keys, samples, baselines):
            stage = baselines[keys[i]]
            if stage.self_hist.total >= self._min_samples:
                slow.append((samples[i] / stage.slow_threshold, spans[i], samples[i], stage, keys[i]))
        slow.sort(key=lambda item: (-item[0], item[1].span_id))
        findings = []
        for ratio, span, self_ns, stage, key in slow[: self._max]:
            p50, p99 = (float(v) for v in stage.self_hist.quantiles((0.5, 0.99)))
            network = network_parts(key)
            what = (f"the network from {network[1]} into {key[0]} '{network[0]}' took {ms(self_ns)} ms"
                    if network is not None else f"{span.service} '{span.name}' spent {ms(self_ns)} ms in itself")
            findings.append(finding(
                self.kind, trace.trace_id, span, key,
                detected_at=trace.decided_at,
                event_time=span.end,
                severity="warning",
                score=min(1.0, ratio / 10),
                summary=(
                    f"{what}, {ratio:.1f}x beyond the slow threshold of its baseline (p50 {ms(int(math.exp(p50)))} ms, "
                    f"p99 {ms(int(math.exp(p99)))} ms)."
                ),
                evidence={
                    "stage_kind": KIND_NAMES[key[2]],
                    "self_time_ms": ms(self_ns),
                    "duration_ms": ms(span.end - span.start),
                    "threshold_ms": ms(stage.slow_threshold),
                    "baseline_p50_ms": ms(int(math.exp(p50))),
                    "baseline_p99_ms": ms(int(math.exp(p99))),
                    "baseline_samples": round(stage.self_hist.total),
                },
            ))
        return findings

    def learn(self, trace: Trace, flagged: frozenset[AnomalyKind]) -> None:
        """The shared LatencyModel learns through LatencyRegression."""

    def advance(self, now: int) -> list[Anomaly]:
        return []

    def flush(self, now: int) -> list[Anomaly]:
        return []
