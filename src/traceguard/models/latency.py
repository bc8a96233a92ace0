"""Per-stage latency baselines and the windowed shift test behind regressions.

A stage is (service, operation, span kind). Each keeps two ``LogHistogram``
baselines, of self time and of total duration, and the raw samples of the
current event-time window (bounded). When a window closes its median and p90
self time are compared with the baseline's in log space: a window leans when
both moved up by ``regression_min_ratio``. A regression opens when at least
``persist_windows`` leaning windows in a row have, pooled, moved their median
``regression_z`` standard errors and hold more samples above the baseline
median × ``regression_min_ratio`` than the baseline makes at that level of
chance; it closes after as many calm windows. Only
calm windows of a stage with no open regression are merged into the
baseline, so the baseline never learns what it flags. A CLIENT call with its
callee in the trace is judged as the callee's network stage (``features``).

Windows are keyed by the trace's decision time (the pipeline clock), which
only moves forward; the onset is reported in span event time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from traceguard.config import LatencyConfig
from traceguard.models.chance import binomial_sf, normal_sf
from traceguard.models.features import Stage, latency_keys, latency_samples, stages
from traceguard.models.histogram import LogHistogram
from traceguard.models.tails import MIN_TAIL_SAMPLES, SHARE, exponential_tail, tail_reference
from traceguard.native import rows as native
from traceguard.records import Trace

# Normal-consistent scale from the interquartile range; median standard error factor.
_IQR_TO_SIGMA = 1.349
_MEDIAN_SE = 1.2533
_MIN_SCALE = 0.05
_LN2, _LN10 = math.log(2.0), math.log(10.0)
_THRESHOLD_EVERY = 10  # calm windows between two settings of a stage's slow_stage bar
_MAX_RUN = 20  # windows of a run of shifted ones kept for the pooled test
# Windows before a run kept for its onset: a quiet stage's first shifted window
# may not lean far enough by chance, and the run then starts a window late.
_LOOKBACK = 2
_MAX_POOLED = 8  # sparse windows pooled into one (shared_baselines)
QUANTILES = (0.5, 0.95, 0.99)


@dataclass
class Regression:
    """An open (or just closed) regression of one stage."""

    stage: Stage
    onset: int                      # earliest span end time in the first shifted window
    opened_at: int                  # window end at which it opened
    baseline: dict[str, float]      # self-time quantiles, ms
    baseline_total: dict[str, float]
    current: dict[str, float] = field(default_factory=dict)
    current_total: dict[str, float] = field(default_factory=dict)
    magnitude: float = 1.0
    windows: int = 0
    exemplars: list[str] = field(default_factory=list)
    resolved_at: int | None = None


class _Window:
    __slots__ = ("index", "self_ns", "total_ns", "trace_ids", "ends", "min_event", "pooled")

    def __init__(self, index: int) -> None:
        self.index = index
        self.self_ns: list[int] = []
        self.total_ns: list[int] = []
        self.trace_ids: list[str] = []
        self.ends: list[int] = []
        self.min_event = 0
        self.pooled = 0  # earlier windows, too sparse to judge, whose samples this one holds

    def take(self, earlier: "_Window") -> None:
        self.self_ns[:0], self.total_ns[:0] = earlier.self_ns, earlier.total_ns
        self.trace_ids[:0], self.ends[:0] = earlier.trace_ids, earlier.ends
        self.min_event = min(self.min_event, earlier.min_event)
        self.pooled = earlier.pooled + 1


class StageLatency:
    __slots__ = ("self_hist", "total_hist", "window", "shifted", "before", "calm", "regression", "slow_threshold",
                 "last_index", "merged", "sparse")

    def __init__(self, self_hist: LogHistogram | None = None, total_hist: LogHistogram | None = None) -> None:
        """The baselines given are shared (``PodLatency``: a pod's windows on its stage's)."""
        self.self_hist = self_hist if self_hist is not None else LogHistogram()
        self.total_hist = total_hist if total_hist is not None else LogHistogram()
        self.window: _Window | None = None
        self.shifted: list[_Window] = []   # the current run of shifted windows
        self.before: list[tuple[list[int], list[int]]] = []  # (self times, ends) of the last merged windows
        self.calm = 0                      # calm windows in a row while a regression is open
        self.regression: Regression | None = None
        self.slow_threshold: int | None = None  # self time (ns) beyond which a span is a slow_stage
        self.last_index = -1                # the last window that held samples
        self.merged = 0                     # windows merged since slow_threshold was set
        self.sparse: _Window | None = None  # a closed window too sparse to judge, held for the next (shared_baselines)

    def quiet_since(self, index: int) -> bool:
        """No sample since window ``index`` (none in it, nor after)."""
        return self.window is None and self.last_index < index


def beyond_slow_threshold(keys: list[Stage], samples: list[int | None], stages: dict[Stage, StageLatency]) -> list[int]:
    """The indices of the samples above their stage's ``slow_threshold`` (where
    one is set): the reference for ``_rows.beyond_slow_threshold``."""
    out = []
    for i, (key, self_ns) in enumerate(zip(keys, samples)):
        stage = stages.get(key) if self_ns is not None else None
        if stage is not None and stage.slow_threshold is not None and self_ns > stage.slow_threshold:
            out.append(i)
    return out


if native is not None:  # window_samples fills these classes' slots
    native.bind_latency(StageLatency, _Window)


def _ms_quantiles(logs: np.ndarray) -> dict[str, float]:
    values = np.exp(np.quantile(logs, QUANTILES)) / 1e6
    return {f"p{int(q * 100)}_ms": round(float(v), 3) for q, v in zip(QUANTILES, values)}


def _hist_ms_quantiles(hist: LogHistogram) -> dict[str, float]:
    values = np.exp(hist.quantiles(QUANTILES)) / 1e6
    return {f"p{int(q * 100)}_ms": round(float(v), 3) for q, v in zip(QUANTILES, values)}


class LatencyModel:
    """All stage baselines; ``observe`` feeds samples, closing windows yields regression events."""

    def __init__(self, config: LatencyConfig, alert_rate: float = 1e-4, shared_baselines: bool = False) -> None:
        """``shared_baselines``: the keys are judged against baselines another
        model learns (``PodLatency`` sets them on each key's ``StageLatency``):
        nothing is merged into them here. A window with fewer than
        ``min_window_samples`` is then pooled into the next, up to
        ``_MAX_POOLED`` windows, so that a quiet key (one pod's share of a stage)
        is judged over longer windows instead of never."""
        self.config = config
        self._shared = shared_baselines
        # slow_stage: a span beyond its stage's tail at this rarity (models.tails).
        self._sample_rate = alert_rate / SHARE
        self.stages_: dict[Stage, StageLatency] = {}
        self.untracked_samples_ = 0
        self._decay = 0.5 ** (config.window / config.baseline_half_life) if config.baseline_half_life else 1.0
        self._min_shift = math.log(config.regression_min_ratio)
        self._chance = normal_sf(config.regression_z)
        self._swept = 0
        # hears each closed window's (stage, start, samples, p50, p95 self time in ns): the stage page's series
        self.on_window: Callable[[Stage, int, int, float, float], None] | None = None

    def stage(self, key: Stage) -> StageLatency | None:
        return self.stages_.get(key)

    def observe(self, keys: list[Stage], spans, self_times: list[int | None], trace_id: str,
                now: int, events: list[Regression]) -> None:
        """One trace's samples (stage keys, spans and self times aligned); closing
        a stage's previous window may append events. Samples for open windows are
        added in C (``_rows.window_samples``), which leaves the rest here one span
        at a time."""
        index = now // self.config.window
        cap = self.config.max_window_samples
        at, count = 0, len(keys)
        while at < count:
            if native is not None:
                at = native.window_samples(keys, spans, self_times, trace_id, self.stages_, index, cap, at)
                if at == count:
                    return
            self._sample(keys[at], spans[at], self_times[at], trace_id, index, cap, events)
            at += 1

    def _sample(self, key: Stage, span, self_ns: int | None, trace_id: str, index: int, cap: int,
                events: list[Regression]) -> None:
        """One span's sample into its stage's window ``index``, closing the one before."""
        if self_ns is None:
            return
        stages = self.stages_
        stage = stages.get(key)
        if stage is None:
            if len(stages) >= self.config.max_stages:
                self.untracked_samples_ += 1
                return
            stage = stages[key] = StageLatency()
        window = stage.window
        if window is None or window.index != index:
            if window is not None:
                self._close(key, stage, events)
            window = stage.window = _Window(index)
            window.min_event = span.end
            if stage.sparse is not None:
                self._pool(stage, window)
        if len(window.self_ns) < cap:
            window.self_ns.append(self_ns or 1)
            window.total_ns.append((span.end - span.start) or 1)
            window.trace_ids.append(trace_id)
            window.ends.append(span.end)
            if span.end < window.min_event:
                window.min_event = span.end

    def advance(self, now: int, events: list[Regression]) -> None:
        """Closes every window that ended before ``now``'s window (once per window period)."""
        index = now // self.config.window
        if index <= self._swept:
            return
        self._swept = index
        for key, stage in self.stages_.items():
            if stage.window is not None and stage.window.index < index:
                self._close(key, stage, events)

    def resolve_idle(self, now: int, idle_windows: int, events: list[Regression]) -> None:
        """Regressions of keys with no sample for ``idle_windows`` windows are
        resolved at the end of the last window that showed them: a key that
        went away (a replaced pod) will not bring samples that would."""
        horizon = now // self.config.window - idle_windows
        for stage in self.stages_.values():
            if stage.regression is not None and stage.quiet_since(horizon):
                self._forget_run(stage, events)

    def flush(self, events: list[Regression]) -> None:
        for key, stage in self.stages_.items():
            if stage.window is not None:
                self._close(key, stage, events, last=True)
            elif stage.sparse is not None:
                self._judge_sparse(stage, stage.sparse)

    def _pool(self, stage: StageLatency, window: _Window) -> None:
        """The held sparse window joins ``window``, if it is recent enough (else it is what a sparse window is)."""
        sparse, stage.sparse = stage.sparse, None
        if window.index - sparse.index <= _MAX_POOLED:
            window.take(sparse)
        else:
            self._judge_sparse(stage, sparse)

    def _close(self, key: Stage, stage: StageLatency, events: list[Regression], last: bool = False) -> None:
        window, stage.window = stage.window, None
        config = self.config
        if window.index - stage.last_index > config.persist_windows:
            self._forget_run(stage, events)
        stage.last_index = window.index
        # sorted once, for the series and the window's quantiles (the baseline's bins do not mind the order)
        times = np.sort(window.self_ns)
        if self.on_window is not None:
            self.on_window(key, window.index * config.window, len(times), times[len(times) // 2],
                           times[int(0.95 * (len(times) - 1))])
        logs = np.log(times.astype(float))
        if stage.self_hist.total < config.warmup_samples:
            self._merge(stage, window, logs)
            return
        if len(logs) < config.min_window_samples:
            if self._shared and window.pooled < _MAX_POOLED and not last:
                stage.sparse = window
            else:
                self._judge_sparse(stage, window, logs)
            return
        q25, median, q75, q90 = stage.self_hist.quantiles((0.25, 0.5, 0.75, 0.9))
        scale = max((q75 - q25) / _IQR_TO_SIGMA, _MIN_SCALE)
        # sorted: small arrays, where indexing is far cheaper than np.quantile
        window_median, window_q90 = float(logs[len(logs) // 2]), float(logs[int(0.9 * (len(logs) - 1))])
        shift = window_median - median
        # The upper body must move too: a median that creeps while p90 stays
        # (or falls) is a change of mix, not a slower stage.
        upper_shift = window_q90 - q90
        leaning = shift >= self._min_shift and upper_shift >= self._min_shift
        regression = stage.regression
        if regression is not None:
            if leaning or shift >= self._min_shift:
                stage.calm = 0
                self._describe(regression, [window], shift)
                return
            stage.calm += 1
            if stage.calm >= config.persist_windows:
                regression.resolved_at = (window.index + 1) * config.window
                stage.regression = None
                stage.calm = 0
                self.set_slow_threshold(stage)
                events.append(regression)
            return
        if not leaning:
            stage.shifted = []
            self._merge(stage, window, logs)
            return
        # Every window of the run moved by the minimal ratio; the run's samples
        # together must also have moved significantly. Pooling lets a quiet stage
        # (a dozen samples a window) show a modest shift in a few windows, and a
        # run keeps growing (its last _MAX_RUN windows) until it is significant.
        stage.shifted = stage.shifted[-(_MAX_RUN - 1):] + [window]
        if len(stage.shifted) < config.persist_windows:
            return
        pooled = np.sort(np.log(np.asarray([v for w in stage.shifted for v in w.self_ns], dtype=float)))
        pooled_shift = float(pooled[len(pooled) // 2]) - median
        if pooled_shift / (_MEDIAN_SE * scale / math.sqrt(len(pooled))) < config.regression_z:
            return
        if not self._beyond_chance(stage, pooled, median):
            return
        regression = Regression(
            stage=key,
            onset=self._onset(stage),
            opened_at=(window.index + 1) * config.window,
            baseline=_hist_ms_quantiles(stage.self_hist),
            baseline_total=_hist_ms_quantiles(stage.total_hist),
        )
        self._describe(regression, stage.shifted, pooled_shift)
        stage.regression = regression
        stage.shifted, stage.before = [], []
        stage.slow_threshold = None  # the regression speaks for this stage's slow spans
        events.append(regression)

    def _judge_sparse(self, stage: StageLatency, window: _Window, logs: np.ndarray | None = None) -> None:
        """Too few samples to judge: they are normal unless the stage is regressed or shifting."""
        if stage.regression is None and not stage.shifted:
            self._merge(stage, window, np.log(np.asarray(window.self_ns, dtype=float)) if logs is None else logs)

    def _beyond_chance(self, stage: StageLatency, pooled: np.ndarray, median: float) -> bool:
        """Whether the run's samples above the baseline median × ``regression_min_ratio``
        are too many for the baseline itself to have made them: a binomial tail at
        the baseline's own share above that cut, against the normal tail of
        ``regression_z``. The z test of the median assumes the body of the
        distribution is normal in log space; real stages have heavy, lumpy tails
        (retries, stalls), and a run is made of windows already picked for
        leaning high, so two windows of a quiet stage pass it by chance every
        few hours. Counting needs no shape."""
        cut = median + self._min_shift
        share = stage.self_hist.share_above(cut)
        above = int(np.count_nonzero(pooled > cut))
        return binomial_sf(above - 1, len(pooled), share) <= self._chance

    def _forget_run(self, stage: StageLatency, events: list[Regression]) -> None:
        """After a gap of more than ``persist_windows`` windows without samples, the
        evidence has ended: an open regression is resolved at the end of the last
        window that showed it, and a run of shifted windows starts again. If the
        shift is still there when samples return, it opens anew, with an onset in
        the new data (a stage quiet for an hour is not "still regressed")."""
        stage.shifted, stage.before = [], []
        stage.calm = 0
        regression, stage.regression = stage.regression, None
        if regression is not None:
            regression.resolved_at = (stage.last_index + 1) * self.config.window
            self.set_slow_threshold(stage)
            events.append(regression)

    @staticmethod
    def _onset(stage: StageLatency) -> int:
        """When the shifted run began: the change point of "beyond the baseline p95"
        over its samples in end-time order (a Bernoulli CUSUM: the start of the
        longest stretch where that is more common than halfway between before and
        after). Never earlier than the first affected sample, and not pulled early
        by the few normal samples beyond p95 that came before the change (a window
        holds traces decided in it, whose spans may have ended a decision wait earlier).
        The windows just before the run are searched too (``_LOOKBACK``)."""
        p95 = math.exp(float(stage.self_hist.quantiles((0.95,))[0]))
        windows = stage.before + [(window.self_ns, window.ends) for window in stage.shifted]
        samples = sorted((end, value) for self_ns, ends in windows for value, end in zip(self_ns, ends))
        affected = [value > p95 for _, value in samples]
        if not any(affected):
            return stage.shifted[0].min_event
        level = (0.05 + sum(affected) / len(affected)) / 2
        best, total, start = -math.inf, 0.0, 0
        for i in range(len(samples) - 1, -1, -1):
            total += affected[i] - level
            if affected[i] and total >= best:
                best, start = total, i
        return samples[start][0]

    def _describe(self, regression: Regression, windows: list[_Window], shift: float) -> None:
        self_ns = np.asarray([v for w in windows for v in w.self_ns], dtype=float)
        total_ns = np.asarray([v for w in windows for v in w.total_ns], dtype=float)
        traces = [t for w in windows for t in w.trace_ids]
        regression.current = _ms_quantiles(np.log(self_ns))
        regression.current_total = _ms_quantiles(np.log(total_ns))
        regression.magnitude = round(math.exp(shift), 3)
        regression.windows += len(windows)
        slowest = np.argsort(-self_ns, kind="stable")[:3]
        regression.exemplars = list(dict.fromkeys(traces[i] for i in slowest))

    def _merge(self, stage: StageLatency, window: _Window, logs: np.ndarray) -> None:
        stage.before = stage.before[1 - _LOOKBACK:] + [(window.self_ns, window.ends)]
        if self._shared:
            return
        stage.self_hist.decay(self._decay)
        stage.total_hist.decay(self._decay)
        stage.self_hist.add_logs(logs)
        stage.total_hist.add_logs(np.log(np.asarray(window.total_ns, dtype=float)))
        stage.merged += 1
        # The bar moves slowly: set again every few windows, or at once when a
        # sample went past it (the baseline just learned a new extreme).
        if (stage.slow_threshold is None or stage.merged >= _THRESHOLD_EVERY
                or max(window.self_ns) > stage.slow_threshold):
            self.set_slow_threshold(stage)

    def extreme_duration(self, key: Stage) -> int | None:
        """Twice the longest duration the stage's baseline holds (ns), once its tail
        is measured (``slow_stage_min_samples``): beyond it a whole trace rooted
        there is unlike all its history."""
        stage = self.stages_.get(key)
        if stage is None or stage.total_hist.total < self.config.slow_stage_min_samples:
            return None
        return int(math.exp(stage.total_hist.top() + _LN2))

    def set_slow_threshold(self, stage: StageLatency) -> None:
        config = self.config
        stage.merged = 0
        if stage.self_hist.total < MIN_TAIL_SAMPLES or stage.regression is not None or self._shared:
            stage.slow_threshold = None
            return
        reference = tail_reference(stage.self_hist.total)
        q25, median, q75, q99, q_ref = stage.self_hist.quantiles((0.25, 0.5, 0.75, 0.99, reference))
        scale = max((q75 - q25) / _IQR_TO_SIGMA, _MIN_SCALE)
        tail = float(exponential_tail(q_ref, stage.self_hist.mean_excess(q_ref), self._sample_rate, reference))
        # Real stages stall now and then (GC, a cold cache, CPU starvation): a
        # mixture the tail beyond p99 does not show. Nothing within twice what
        # the baseline has already shown as normal is a per-trace finding: the
        # largest of n samples is beaten by the next one with chance 1/n, far
        # above the budget, but rarely by double.
        seen = stage.self_hist.top()
        # A far component (stalls) inflates the excess the tail is extrapolated
        # from; ten times the largest ever seen is beyond any budget already.
        tail = min(tail, seen + _LN10)
        stage.slow_threshold = int(max(math.exp(median + config.slow_stage_z * scale), math.exp(tail),
                                       math.exp(seen + _LN2), math.exp(q99) + config.slow_stage_min_excess))


_MAX_PODS = 64  # pods of one stage with windows each
_IDLE_WINDOWS = 20  # windows without a sample after which a pod's windows may make room for a new pod


class PodLatency:
    """One stage's windows per pod, judged against the stage's baseline.

    A slowdown on one pod of three moves its stage's median about 1.4x: at the
    edge of the stage's own test, and one pod of ten would not move it at all.
    The pods of a service are replicas: their normal is the service's. So each
    (stage, pod) pair of a stage that more than one pod serves is a key of a
    ``LatencyModel`` of its own (``(service, operation, kind, pod)``) whose
    baseline is the stage's, learned by the stage model (``stage_model``); its
    sparse windows are pooled. What it reports is a pod that differs from its
    peers: a regression that opens while at least half of the stage's other
    live pods (a sample within ``_IDLE_WINDOWS``) are shifted or regressed too,
    or while it has no live peer, is the whole service's, left to the stage's
    test, and is not reported (nor, later, its resolution). A pod that went
    away with its regression open has it resolved after ``_IDLE_WINDOWS``. Only a
    span's own stage is kept per pod (not the network stage a client's time is
    judged as).
    """

    def __init__(self, config: LatencyConfig, stage_model: LatencyModel) -> None:
        self.model = LatencyModel(config, shared_baselines=True)
        self._stages = stage_model.stages_
        self.pods_: dict[Stage, set[str]] = {}  # the pods seen serving each stage
        self._max_stages = config.max_stages
        self._shared: set[tuple] = set()  # pod keys whose open regression their peers share
        # Services seen on more than one pod: only their spans are looked at one by one.
        # Most traffic is of services with one pod; a trace's (service, pod) pairs, all
        # seen before, tell that with one set operation.
        self._first_pod: dict[str, str] = {}
        self._multi: set[str] = set()
        self._seen: set[tuple[str, str | None]] = set()
        self._idle_checked = -1  # the window in which pods gone quiet were last resolved

    def observe(self, trace: Trace, now: int, events: list[Regression]) -> None:
        """One decided trace's spans (``LatencyModel.observe``), those of stages more than one pod serves."""
        pairs = {(span.service, span.instance) for span in trace.spans}
        if not pairs <= self._seen:
            self._meet(pairs - self._seen)
        multi = self._multi
        if not multi:
            return
        pods_of = self.pods_
        pod_keys, pod_spans, pod_times = [], [], []
        for key, judged_as, span, self_ns in zip(stages(trace), latency_keys(trace), trace.spans,
                                                 latency_samples(trace)):
            pod = span.instance
            if span.service not in multi or pod is None or self_ns is None or judged_as is not key:
                continue
            pods = pods_of.get(key)
            if pods is None:
                if len(pods_of) < self._max_stages:
                    pods_of[key] = {pod}
                continue
            if pod not in pods:
                if (len(pods) >= _MAX_PODS and not self._evict_idle(key, pods, now)) or not self._track(key, pod):
                    self.model.untracked_samples_ += 1
                    continue
                pods.add(pod)
                if len(pods) == 2:
                    self._track(key, next(p for p in pods if p != pod))
            if len(pods) > 1:
                pod_keys.append((*key, pod))
                pod_spans.append(span)
                pod_times.append(self_ns)
        if pod_keys:
            found: list[Regression] = []
            self.model.observe(pod_keys, pod_spans, pod_times, trace.trace_id.hex(), now, found)
            self._odd(found, events)

    def _meet(self, pairs: set[tuple[str, str | None]]) -> None:
        """(service, pod) pairs not seen before: a service's second pod makes it one to look at."""
        for service, pod in pairs:
            if pod is not None:
                first = self._first_pod.get(service)
                if first is None:
                    if len(self._first_pod) < self._max_stages:
                        self._first_pod[service] = pod
                elif first != pod:
                    self._multi.add(service)
        if len(self._seen) + len(pairs) > self._max_stages:  # pods come and go: a cache, not a record
            self._seen.clear()
        self._seen |= pairs

    def _evict_idle(self, stage: Stage, pods: set[str], now: int) -> bool:
        """Room for a new pod of a stage that has ``_MAX_PODS``: the one idle longest goes,
        if it has had no sample for ``_IDLE_WINDOWS`` windows and is not regressed
        (rolling restarts replace pods all day)."""
        keys, horizon = self.model.stages_, now // self.model.config.window - _IDLE_WINDOWS
        idle = [(entry.last_index if entry is not None else -1, pod) for pod in pods
                if (entry := keys.get((*stage, pod))) is None
                or (entry.regression is None and entry.quiet_since(horizon))]
        if not idle:
            return False
        _, pod = min(idle)
        pods.discard(pod)
        keys.pop((*stage, pod), None)
        self._shared.discard((*stage, pod))
        return True

    def _track(self, stage: Stage, pod: str) -> bool:
        """A key for this pod of the stage, on the stage's baseline (none past max_stages)."""
        baseline = self._stages.get(stage)
        if baseline is None or len(self.model.stages_) >= self.model.config.max_stages:
            return False
        self.model.stages_[(*stage, pod)] = StageLatency(baseline.self_hist, baseline.total_hist)
        return True

    def advance(self, now: int, events: list[Regression]) -> None:
        found: list[Regression] = []
        self.model.advance(now, found)
        index = now // self.model.config.window
        if index != self._idle_checked:
            self._idle_checked = index
            self.model.resolve_idle(now, _IDLE_WINDOWS, found)
        self._odd(found, events)

    def flush(self, events: list[Regression]) -> None:
        found: list[Regression] = []
        self.model.flush(found)
        self._odd(found, events)

    def _odd(self, found: list[Regression], events: list[Regression]) -> None:
        for regression in found:
            key = regression.stage
            if regression.resolved_at is not None:
                if key in self._shared:
                    self._shared.discard(key)
                    continue
            elif self._service_wide(key, regression.opened_at // self.model.config.window):
                self._shared.add(key)
                continue
            events.append(regression)

    def _service_wide(self, key: tuple, index: int) -> bool:
        """Whether the pod has no live peer to differ from (a service of one replica,
        renamed by a restart), or at least half of its live peers shifted too."""
        stage, pod = key[:3], key[3]
        keys, since = self.model.stages_, index - _IDLE_WINDOWS
        peers = [peer for other in self.pods_.get(stage, ()) if other != pod
                 and (peer := keys.get((*stage, other))) is not None and not peer.quiet_since(since)]
        shifted = sum(1 for peer in peers if peer.regression is not None or peer.shifted)
        return shifted >= max(1, (len(peers) + 1) // 2) or not peers
