"""``trace_outlier``: the isolation forest finds the trace's shape and timings unlike the rest.

A root operation is judged by its own forest once that is warm, never
before; only root operations beyond ``max_root_operations`` fall back to the
shared forest. Traces are scored in vectorised batches of ``forest.batch`` (scikit-learn
costs milliseconds per call, microseconds per row), so these findings come up to
a batch (or ``max_delay``) later than the trace's decision. A trace is an outlier when its score is
below the forest's threshold and at least one feature deviates by
``min_feature_z``, or when a feature deviates by ``extreme_feature_z``: an
isolation tree splits only within the range it was trained on, so a value far
beyond it (30 identical queries where one is normal) isolates no sooner than
the edge of the normal range does. The finding lists the features that
deviate most.
Deviations count only upwards (slower, bigger, more errors or repeats): a
fast trace is never an outlier, so a forest warmed up during a slow spell is
outgrown by the faster traffic that joins its buffer. Each feature's bar is
the larger of ``min_feature_z`` and its own tail in the buffer, extrapolated
to the ``learned.alert_rate`` budget. Only traces that no detector flagged and
that deviate in no feature join the buffer.
"""

from __future__ import annotations

import math

import numpy as np

from traceguard.detect.base import finding
from traceguard.models.forest import ForestModel, RootForest
from traceguard.models.latency import LatencyModel
from traceguard.models.structure import StructureModel
from traceguard.records import Anomaly, AnomalyKind, Span, Trace

RootOperation = tuple[str, str]


class _Pending:
    __slots__ = ("trace_id", "root", "key", "row", "shared_row", "normal")

    def __init__(self, trace_id: bytes, root: Span, key: RootOperation, row, shared_row) -> None:
        self.trace_id = trace_id
        self.root = root
        self.key = key
        self.row = row
        self.shared_row = shared_row
        self.normal = False


class TraceOutlier:
    kind = AnomalyKind.TRACE_OUTLIER

    def __init__(self, model: ForestModel, latency: LatencyModel) -> None:
        self.model = model
        self.latency = latency
        self.config = model.config
        self._pending: list[_Pending] = []
        self._by_trace: dict[bytes, _Pending] = {}
        self._oldest = 0  # decision time of the first pending trace

    def detect(self, trace: Trace) -> list[Anomaly]:
        root = trace.root
        if root is None or not root.finished:
            return []  # structural findings speak for such traces
        key = StructureModel.root_operation(trace)
        forest = self.model.forest_for(key)
        if forest is not None:
            pending = _Pending(trace.trace_id, root, key, forest.row(trace), None)
        else:
            pending = _Pending(trace.trace_id, root, key, None, self.model.shared_.row(trace))
        if not self._pending:
            self._oldest = trace.decided_at
        self._pending.append(pending)
        self._by_trace[trace.trace_id] = pending
        return []

    def waiting(self) -> int:
        """Decided traces held for the next batch."""
        return len(self._pending)

    def learn(self, trace: Trace, flagged: frozenset[AnomalyKind]) -> None:
        """Its buffer of normal traces takes only traces nothing flagged (and, when
        scored, that deviate in no feature): it learns shapes, not frequencies."""
        pending = self._by_trace.get(trace.trace_id)
        if pending is not None and not flagged:
            pending.normal = True

    def advance(self, now: int) -> list[Anomaly]:
        if len(self._pending) >= self.config.batch or (self._pending and now - self._oldest >= self.config.max_delay):
            return self._score(now)
        return []

    def flush(self, now: int) -> list[Anomaly]:
        return self._score(now)

    def _score(self, now: int) -> list[Anomaly]:
        pending, self._pending, self._by_trace = self._pending, [], {}
        flagged: dict[int, Anomaly] = {}
        deviant: set[int] = set()
        groups: dict[int, tuple[RootForest, list[int], bool]] = {}
        for position, item in enumerate(pending):
            own = item.row is not None  # past max_root_operations a root operation has no forest of its own
            chosen = self.model.forests_[item.key] if own else self.model.shared_
            groups.setdefault(id(chosen), (chosen, [], own))[1].append(position)
        vectors: list[np.ndarray | None] = [None] * len(pending)
        for forest, positions, own in groups.values():
            forest.settle()
            rows = forest.matrix([pending[p].row if own else pending[p].shared_row for p in positions])
            for i, p in enumerate(positions):
                vectors[p] = rows[i]
            if not forest.fitted:
                continue
            scores, z = forest.score(rows)
            beyond = z >= forest.z_threshold_
            confirmed = beyond & (rows[:, forest.columns_] > self._history_bars(forest, pending[positions[0]].root))
            out = np.flatnonzero(beyond.any(axis=1))  # rows out in any feature: few
            # A stall is one process: stages of two services out at once are not one.
            services = [stage[0] if stage is not None else None for stage in forest.column_stages_]
            for i in out:
                if len({services[c] for c in np.flatnonzero(beyond[i]) if services[c] is not None}) >= 2:
                    confirmed[i] |= beyond[i]
            extreme = (z >= np.maximum(forest.z_threshold_, self.config.extreme_feature_z)) & confirmed
            for i in out:
                p = positions[i]
                deviant.add(p)
                if confirmed[i].any() and (scores[i] < forest.threshold_ or extreme[i].any()):
                    flagged[p] = self._anomaly(pending[p], forest, float(scores[i]), z[i], rows[i], now, own)
        for position, item in enumerate(pending):
            # Learn only from the normal: not flagged, and not far out in any feature either.
            if item.normal and position not in deviant:
                forest = self.model.forests_[item.key] if item.row is not None else self.model.shared_
                forest.add(vectors[position])
        return [flagged[p] for p in sorted(flagged)]

    def _history_bars(self, forest: RootForest, root: Span) -> np.ndarray:
        """Per feature, what a deviation must also pass: the forest's buffer is a
        few thousand recent traces, too few to have seen what a stage does once in
        ten thousand calls (a GC stall), while each stage's latency baseline has
        seen all traffic. A stage's time must be beyond its slow_stage bar, the
        trace's duration beyond twice the longest its root stage has taken (not
        judged until they are known); counts are judged by the forest alone, and so
        are stage times out in two services or more at once."""
        bars = np.full(len(forest.columns_), -np.inf)
        latency, measured = self.latency.stages_, self.latency.config.slow_stage_min_samples
        for column, stage in enumerate(forest.column_stages_):
            if stage is not None:
                entry = latency.get(stage)
                # as mature as slow_stage's own reports: a stall seen, not guessed
                bar = entry.slow_threshold if entry is not None and entry.self_hist.total >= measured else None
                bars[column] = math.log1p(bar / 1e3) if bar else np.inf
        if forest.with_stages:
            longest = self.latency.extreme_duration((root.service, root.name, root.kind))
            bars[0] = math.log(longest / 1e6) if longest else np.inf
        return bars

    def _anomaly(self, item: _Pending, forest: RootForest, score: float, row_z, row, now: int, own: bool) -> Anomaly:
        reasons = forest.explain(row_z, row)
        root = item.root
        described = ", ".join(f"{r['feature']} {r['value']} (normal {r['median']})" for r in reasons)
        return finding(
            self.kind, item.trace_id, root,
            detected_at=now,
            event_time=root.start,
            severity="warning",
            score=min(1.0, max(0.0, forest.threshold_ - score) * 10 + 0.5),
            summary=f"{root.service} '{root.name}' is unlike its normal traces: {described}.",
            evidence={
                "forest": "root_operation" if own else "shared",
                "anomaly_score": round(score, 4),
                "threshold": round(forest.threshold_, 4),
                "features": reasons,
            },
        )
