"""Isolation forests over fixed-width trace feature vectors.

One forest per root operation, plus a shared one (generic features only) for
the root operations past ``max_root_operations``. A root operation that is
not yet warm is not judged: scored by the shared forest, its traces were
flagged merely for being rare among the others. Features: log total duration,
span count, depth, largest fan-out, errors, distinct services, the most
repeated call under one parent (an N+1 query stands out here), and the self
time of the stages that carry the most self time at fit time.

Each forest keeps a ring buffer of recent normal traces and is fitted on it
after ``warmup_traces`` and again every ``refit_every``. A fitted forest is a
function of that buffer and the seed, which is why a model file stores the
buffer, not the trees: loading refits, and nothing is unpickled.

Scores follow scikit-learn's ``score_samples`` (lower = more anomalous); the
threshold is the ``score_quantile`` of the training scores. The forest ranks,
and a feature deviation of ``min_feature_z`` robust sigmas keeps the rare but
normal (a retry, a cache miss) from being reported: both must agree.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.ensemble import IsolationForest

from traceguard.config import ForestConfig
from traceguard.models.features import Stage, latency_keys, latency_samples, shape
from traceguard.models.tails import SHARE, exponential_tail, tail_reference
from traceguard.records import KIND_NAMES, Trace

GENERIC_FEATURES = ("log_duration_ms", "span_count", "depth", "max_fan_out", "errors", "services", "max_repeated_calls")
STAGE_COLUMNS = 32  # stages of one root operation whose self time is recorded


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """Expected path length of an unsuccessful search in a BST of n points (Liu et al.)."""
    n = np.asarray(n, dtype=float)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class _StackedTrees:
    """The fitted trees as one flat array of nodes, so a batch walks all trees at once.

    scikit-learn scores tree by tree through joblib, which costs about 0.3 ms
    per tree per call whatever the batch size; walking (trees x rows) nodes
    level by level in numpy gives the same scores (checked in the tests) for a
    fraction of that. Nodes are numbered across all trees (tree t's node i is
    ``t * width + i``) and children hold those numbers, so each step is a few
    ``take`` over 1-D arrays instead of 2-D fancy indexing.
    """

    def __init__(self, estimator: IsolationForest) -> None:
        trees = [tree.tree_ for tree in estimator.estimators_]
        width = max(tree.node_count for tree in trees)
        count = len(trees)
        feature = np.zeros((count, width), dtype=np.intp)
        threshold = np.zeros((count, width))
        left = np.full((count, width), -1, dtype=np.intp)
        right = np.full((count, width), -1, dtype=np.intp)
        leaf_length = np.zeros((count, width))
        self.levels = 0
        for t, tree in enumerate(trees):
            n = tree.node_count
            offset = t * width
            feature[t, :n] = np.maximum(tree.feature, 0)
            threshold[t, :n] = tree.threshold
            left[t, :n] = np.where(tree.children_left >= 0, tree.children_left + offset, -1)
            right[t, :n] = np.where(tree.children_right >= 0, tree.children_right + offset, -1)
            depth = tree.compute_node_depths()  # the root is at depth 1
            leaf_length[t, :n] = depth + _average_path_length(tree.n_node_samples) - 1.0
            self.levels = max(self.levels, int(depth.max()) - 1)
        self.feature, self.threshold = feature.ravel(), threshold.ravel()
        self.left, self.right, self.leaf_length = left.ravel(), right.ravel(), leaf_length.ravel()
        self.roots = np.arange(count, dtype=np.intp) * width
        self.norm = count * float(_average_path_length([estimator.max_samples_])[0])

    def score_samples(self, rows: np.ndarray) -> np.ndarray:
        """Same as ``IsolationForest.score_samples`` (lower = more anomalous)."""
        rows = np.ascontiguousarray(rows, dtype=float)
        values = rows.ravel()
        row_starts = (np.arange(len(rows), dtype=np.intp) * rows.shape[1])[None, :]
        node = np.repeat(self.roots[:, None], len(rows), axis=1)  # (trees, rows): flat node numbers
        for _ in range(self.levels):
            left = self.left.take(node)
            go_left = values.take(row_starts + self.feature.take(node)) <= self.threshold.take(node)
            node = np.where(left < 0, node, np.where(go_left, left, self.right.take(node)))
        lengths = self.leaf_length.take(node).sum(axis=0)
        return -np.power(2.0, -lengths / self.norm)


def stage_label(stage: Stage) -> str:
    service, operation, kind = stage
    return f"self_time_ms[{service} '{operation}' {KIND_NAMES[kind]}]"


class RootForest:
    """The forest of one root operation (``with_stages``) or the shared one."""

    def __init__(self, config: ForestConfig, with_stages: bool, alert_rate: float = 1e-4) -> None:
        self.config = config
        self.alert_rate = alert_rate
        self.z_threshold_: np.ndarray | None = None
        self.with_stages = with_stages
        self.stage_index_: dict[Stage, int] = {}
        width = len(GENERIC_FEATURES) + (STAGE_COLUMNS if with_stages else 0)
        self.reservoir_ = np.zeros((config.reservoir, width))
        self.filled_ = 0
        self.next_ = 0
        self.since_fit_ = 0
        self.estimator_: IsolationForest | None = None
        self.trees_: _StackedTrees | None = None
        self.columns_: np.ndarray | None = None
        self.feature_names_: list[str] = []
        self.column_stages_: list[Stage | None] = []  # the stage of each stage feature (None: generic)
        self.threshold_ = -math.inf
        self.median_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self._generic = len(GENERIC_FEATURES)

    @property
    def fitted(self) -> bool:
        return self.estimator_ is not None

    def row(self, trace: Trace) -> list[float]:
        """The trace's raw feature values in this forest's layout (stage times in ns):
        a plain list, made into arrays a batch at a time by ``matrix``."""
        root = trace.root
        features = shape(trace)
        generic = [math.log(max(root.end - root.start, 1) / 1e6)] + [features[name] for name in GENERIC_FEATURES[1:]]
        if not self.with_stages:
            return generic
        totals = [0] * STAGE_COLUMNS
        index = self.stage_index_
        for stage, self_ns in zip(latency_keys(trace), latency_samples(trace)):
            if self_ns is None:
                continue
            column = index.get(stage)
            if column is None:
                if len(index) >= STAGE_COLUMNS:
                    continue
                column = index[stage] = len(index)
            totals[column] += self_ns
        generic.extend(totals)
        return generic

    def matrix(self, rows: list[list[float]]) -> np.ndarray:
        """Raw rows (``row``) as this forest's feature vectors, one per line."""
        out = np.array(rows, dtype=float)
        if self.with_stages:
            generic = len(GENERIC_FEATURES)
            out[:, generic:] = np.log1p(out[:, generic:] / 1e3)  # log of µs
        return out

    def add(self, row: np.ndarray) -> None:
        """A normal trace joins the buffer; fits when warm, refits periodically."""
        self.reservoir_[self.next_] = row
        self.next_ = (self.next_ + 1) % len(self.reservoir_)
        self.filled_ = min(self.filled_ + 1, len(self.reservoir_))
        self.since_fit_ += 1
        warm = self.filled_ >= min(self.config.warmup_traces, len(self.reservoir_))
        if warm and (self.estimator_ is None or self.since_fit_ >= self.config.refit_every):
            self.fit()

    def fit(self) -> None:
        config = self.config
        data = self.reservoir_[: self.filled_]
        columns = list(range(len(GENERIC_FEATURES)))
        names = list(GENERIC_FEATURES)
        column_stages: list[Stage | None] = [None] * len(columns)
        if self.with_stages and config.top_stages:
            base = len(GENERIC_FEATURES)
            by_index = {column: stage for stage, column in self.stage_index_.items()}
            weight = data[:, base: base + len(by_index)].mean(axis=0)
            for column in np.argsort(-weight, kind="stable")[: config.top_stages]:
                columns.append(base + int(column))
                names.append(stage_label(by_index[int(column)]))
                column_stages.append(by_index[int(column)])
        self.columns_ = np.asarray(columns)
        self.feature_names_ = names
        self.column_stages_ = column_stages
        features = data[:, self.columns_]
        self.estimator_ = IsolationForest(
            n_estimators=config.n_estimators, max_samples=min(256, len(features)), random_state=config.seed,
        ).fit(features)
        self.trees_ = _StackedTrees(self.estimator_)
        self.threshold_ = float(np.quantile(self.trees_.score_samples(features), config.score_quantile))
        # Robust centre and scale per feature. A stage's self time is judged
        # among the traces that have the stage: whether it is there at all is
        # structure (missing_expected_span), and an optional branch would
        # otherwise look like a huge deviation every time it is taken.
        generic = len(GENERIC_FEATURES)
        self.median_ = np.median(features, axis=0)
        mad = np.median(np.abs(features - self.median_), axis=0) * 1.4826
        for column in range(generic, features.shape[1]):
            present = features[:, column][features[:, column] > 0]
            if len(present):
                self.median_[column] = np.median(present)
                mad[column] = np.median(np.abs(present - self.median_[column])) * 1.4826
        # Counts move in whole steps: one more error or retry is one unit, not
        # "infinitely many MADs" when most traces have none. Log features: 0.25.
        floor = np.full(features.shape[1], 0.25)
        floor[1:generic] = 1.0
        self.scale_ = np.maximum(mad, floor)
        # Per-feature deviation threshold from the buffer's own tail (heavy
        # tails get a higher bar than min_feature_z), as slow_stage does.
        z = self._one_sided_z(features)
        reference = tail_reference(len(z))
        q_ref = np.quantile(z, reference, axis=0)
        excess = np.where(z > q_ref, z - q_ref, 0.0).sum(axis=0) / np.maximum((z > q_ref).sum(axis=0), 1)
        tail = exponential_tail(q_ref, excess, self.alert_rate / max(SHARE, z.shape[1]), reference)
        # Stage times get min_feature_z only: a stall or two in the buffer would
        # inflate their tail, and what a stage does too rarely for this buffer to
        # show is judged against its latency history instead (TraceOutlier).
        self.z_threshold_ = np.maximum(tail, config.min_feature_z)
        self.z_threshold_[generic:] = config.min_feature_z
        self.since_fit_ = 0

    def _one_sided_z(self, features: np.ndarray) -> np.ndarray:
        """Robust z of each feature, only upwards: every feature is worse when
        higher (slower, bigger, more errors, more repeats); a fast or small trace
        is not an anomaly. Absent stages count as no deviation."""
        z = np.maximum((features - self.median_) / self.scale_, 0.0)
        z[:, self._generic:] = np.where(features[:, self._generic:] > 0, z[:, self._generic:], 0.0)
        return z

    def score(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, robust z per feature) for rows of this forest's layout."""
        features = rows[:, self.columns_]
        return self.trees_.score_samples(features), self._one_sided_z(features)

    def explain(self, row_z: np.ndarray, row: np.ndarray, top: int = 3) -> list[dict]:
        """The features that deviate most from the training median."""
        features = row[self.columns_]
        out = []
        for column in np.argsort(-np.abs(row_z), kind="stable")[:top]:
            name = self.feature_names_[column]
            value, median = float(features[column]), float(self.median_[column])
            stage = None
            if name == "log_duration_ms":
                name, value, median = "duration_ms", math.exp(value), math.exp(median)
            elif name.startswith("self_time_ms"):
                value, median = math.expm1(value) / 1e3, math.expm1(median) / 1e3
                stage = next((s for s in self.stage_index_ if stage_label(s) == name), None)
            out.append({"feature": name, "value": round(value, 3), "median": round(median, 3),
                        "robust_z": round(float(row_z[column]), 2),
                        **({"stage": {"service": stage[0], "operation": stage[1], "kind": KIND_NAMES[stage[2]]}}
                           if stage else {})})
        return out


class ForestModel:
    """All forests: one per root operation (up to ``max_root_operations``) and the shared one."""

    def __init__(self, config: ForestConfig, alert_rate: float = 1e-4) -> None:
        self.config = config
        self.alert_rate = alert_rate
        self.forests_: dict[tuple[str, str], RootForest] = {}
        self.shared_ = RootForest(config, with_stages=False, alert_rate=alert_rate)

    def forest_for(self, key: tuple[str, str]) -> RootForest | None:
        forest = self.forests_.get(key)
        if forest is None and len(self.forests_) < self.config.max_root_operations:
            forest = self.forests_[key] = RootForest(self.config, with_stages=True, alert_rate=self.alert_rate)
        return forest
