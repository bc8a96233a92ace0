"""Detectors: small units, each named by what it finds, run in a declared order.

``REGISTRY`` is every trace detector, one line each: its kind, the group it
runs in, whether it needs the learned models, and how it is made from the
configuration (the section it reads is in its line) and the models. A new
detector is its module plus one line here; ``tests/test_detector_contract.py``
walks every line through the same checks and fails for a kind without a
fault fixture. (``late_span`` is not a trace detector: it judges a span that
arrives after its trace was decided, and the pipeline holds it.)

The groups, in the order a decided trace meets them:

* ``completeness``: every trace; what is missing or broken, structural or learned.
  Error rates count every trace, so they run here (their findings are
  stage-level and come as windows end).
* ``timing``: only a trace no completeness check flagged: the timings and
  shape of an incomplete trace only echo what is missing. SlowStage scores a
  trace before LatencyRegression adds its spans to the current window.
* ``every``: what a trace logged, judged on every trace; gates nothing.

Within a group, the order of the lines is the order of the findings of one
trace (part of byte-identical replay): whole-trace problems first, then
per-span ones from broken to suspicious.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from traceguard.config import PipelineConfig
from traceguard.detect.base import LearnedDetector, TraceDetector, WindowedDetector
from traceguard.detect.context_outlived_parent import ContextOutlivedParent
from traceguard.detect.error_regression import ErrorRegression
from traceguard.detect.late_span import LateSpan
from traceguard.detect.latency_regression import LatencyRegression
from traceguard.detect.log_anomaly import LogAnomaly
from traceguard.detect.missing_expected_span import MissingExpectedSpan
from traceguard.detect.missing_parent import MissingParent
from traceguard.detect.missing_root import MissingRoot
from traceguard.detect.slow_stage import SlowStage
from traceguard.detect.trace_outlier import TraceOutlier
from traceguard.detect.unfinished_span import UnfinishedSpan
from traceguard.detect.unpaired_client_span import UnpairedClientSpan
from traceguard.models import Models
from traceguard.models.rates import WindowCalls
from traceguard.models.series import StageSeries
from traceguard.records import AnomalyKind as K

Group = Literal["completeness", "timing", "every"]


@dataclass
class Wiring:
    """What a detector is made from: the settings, the models, the counters
    detectors share (one count of every stage's calls per window length), and
    the stage series the windowed ones feed for the web view."""

    config: PipelineConfig
    models: Models
    series: StageSeries | None = None
    _stage_calls: dict[int, WindowCalls] = field(default_factory=dict)

    def stage_calls(self, window: int) -> WindowCalls:
        calls = self._stage_calls.get(window)
        if calls is None:
            calls = self._stage_calls[window] = WindowCalls(window, 0)
        return calls


@dataclass(frozen=True)
class Registration:
    kind: K
    group: Group
    make: Callable[[Wiring], TraceDetector]
    learned: bool = False  # needs learned.enabled
    enabled: Callable[[PipelineConfig], bool] = lambda config: True


REGISTRY: tuple[Registration, ...] = (
    Registration(K.MISSING_ROOT, "completeness", lambda w: MissingRoot()),
    Registration(K.MISSING_PARENT, "completeness", lambda w: MissingParent()),
    Registration(K.UNFINISHED_SPAN, "completeness", lambda w: UnfinishedSpan()),
    Registration(K.CONTEXT_OUTLIVED_PARENT, "completeness", lambda w: ContextOutlivedParent(
        w.config.structural, w.stage_calls(w.config.structural.norm_window))),
    # a fragment (serve.scope local) holds its CLIENT spans but never the servers they called in other pods
    Registration(K.UNPAIRED_CLIENT_SPAN, "completeness", lambda w: UnpairedClientSpan(w.config.structural),
                 enabled=lambda config: config.serve.scope == "trace"),
    Registration(K.ERROR_REGRESSION, "completeness", lambda w: ErrorRegression(
        w.config.errors, w.stage_calls(w.config.errors.window), w.series)),
    Registration(K.MISSING_EXPECTED_SPAN, "completeness",
                 lambda w: MissingExpectedSpan(w.models.structure, w.config.structural), learned=True),
    Registration(K.SLOW_STAGE, "timing", lambda w: SlowStage(w.models.latency, w.config.learned.latency), learned=True),
    Registration(K.LATENCY_REGRESSION, "timing",
                 lambda w: LatencyRegression(w.models.latency, w.models.pod_latency, w.series), learned=True),
    Registration(K.TRACE_OUTLIER, "timing", lambda w: TraceOutlier(w.models.forest, w.models.latency), learned=True),
    Registration(K.LOG_ANOMALY, "every", lambda w: LogAnomaly(w.models.templates), learned=True,
                 enabled=lambda config: config.learned.templates.enabled),
)


def build(config: PipelineConfig, models: Models,
          series: StageSeries | None = None) -> dict[Group, list[TraceDetector]]:
    """The detectors the configuration turns on, by group, in registry order."""
    wiring = Wiring(config, models, series)
    groups: dict[Group, list[TraceDetector]] = {"completeness": [], "timing": [], "every": []}
    for registration in REGISTRY:
        if (config.learned.enabled or not registration.learned) and registration.enabled(config):
            groups[registration.group].append(registration.make(wiring))
    return groups


__all__ = ["REGISTRY", "LateSpan", "LearnedDetector", "Registration", "TraceDetector", "WindowedDetector", "build"]
