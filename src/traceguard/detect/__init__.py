"""Detectors: small units, each named by what it finds, run in a declared order."""

from __future__ import annotations

from traceguard.config import ErrorsConfig, LearnedConfig, StructuralConfig
from traceguard.detect.base import LearnedDetector, TraceDetector, WindowedDetector
from traceguard.detect.context_outlived_parent import ContextOutlivedParent
from traceguard.detect.error_regression import ErrorRegression
from traceguard.detect.late_span import LateSpan
from traceguard.detect.latency_regression import LatencyRegression
from traceguard.detect.log_anomaly import LogAnomaly
from traceguard.detect.missing_parent import MissingParent
from traceguard.detect.missing_expected_span import MissingExpectedSpan
from traceguard.detect.missing_root import MissingRoot
from traceguard.detect.slow_stage import SlowStage
from traceguard.detect.trace_outlier import TraceOutlier
from traceguard.detect.unfinished_span import UnfinishedSpan
from traceguard.detect.unpaired_client_span import UnpairedClientSpan
from traceguard.models import Models
from traceguard.models.rates import WindowCalls


def completeness_detectors(config: StructuralConfig, errors: ErrorsConfig) -> list[TraceDetector]:
    """The structural checks, in the order their findings are emitted per trace.

    Order matters only for output order (it is part of byte-identical replay):
    whole-trace problems first, then per-span ones from broken to suspicious.
    Error rates count every trace, so they run with these (their findings are
    stage-level and come as windows end); they and the outlived-parent norms
    share one count of every stage's calls when their windows agree.
    """
    calls = WindowCalls(config.norm_window, config.norm_max_stages) if errors.window == config.norm_window else None
    return [
        MissingRoot(),
        MissingParent(),
        UnfinishedSpan(),
        ContextOutlivedParent(config, calls),
        UnpairedClientSpan(config),
        ErrorRegression(errors, calls),
    ]


def learned_detectors(models: Models, config: LearnedConfig, structural: StructuralConfig
                      ) -> tuple[list[WindowedDetector], list[WindowedDetector], list[WindowedDetector]]:
    """(completeness, timing, every trace) learned checks. A trace reaches the
    timing checks only if no completeness check, structural or learned,
    flagged it: the timings and shape of an incomplete trace only echo what is
    missing. SlowStage scores a trace before LatencyRegression adds its spans
    to the current window. What a trace logged is judged on every trace, and
    gates nothing."""
    return (
        [MissingExpectedSpan(models.structure, structural)],
        [SlowStage(models.latency, config.latency), LatencyRegression(models.latency), TraceOutlier(models.forest, models.latency)],
        [LogAnomaly(models.templates)] if config.templates.enabled else [],
    )


__all__ = ["LateSpan", "LearnedDetector", "TraceDetector", "WindowedDetector", "completeness_detectors", "learned_detectors"]
