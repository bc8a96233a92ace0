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
function of the buffer at that fit and the seed. A model file stores the buffer
and what the last fit made, the trees included, as arrays: a loaded forest
is the one in memory (nothing is unpickled, and saving does not refit, which
would change what a running process finds after it).

A fit takes 20-40 ms (100 trees: the trees grown by scikit-learn's tree
builder called directly, the very trees ``IsolationForest`` grows, see
``_grow``; 150-200 ms through the estimator). In event time it runs where it
is due.
Live (wall clock), it runs on a thread of its own
(``ForestModel.fit_in_background``) on a copy of the buffer while decisions
go on, and the next batch takes it in, waiting for it only if it is not
done yet: the batch that a fit where it was due would score with the new
forest scores with it too, so the findings are the same, and a refit no
longer stalls decisions (nor the receivers waiting for the pipeline's lock)
for its whole length.

Scores follow scikit-learn's ``score_samples`` (lower = more anomalous); the
threshold is the ``score_quantile`` of the training scores. The forest ranks,
and a feature deviation of ``min_feature_z`` robust sigmas keeps the rare but
normal (a retry, a cache miss) from being reported: both must agree.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

try:  # the tree walk in C; the numpy walk below where it is not built
    from traceguard import _forest
except ImportError:
    _forest = None

from traceguard.config import ForestConfig
from traceguard.models.features import Stage, latency_keys, latency_samples, shape
from traceguard.models.tails import SHARE, exponential_tail, tail_reference
from traceguard.native import in_c
from traceguard.records import KIND_NAMES, Trace

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

GENERIC_FEATURES = ("log_duration_ms", "span_count", "depth", "max_fan_out", "errors", "services", "max_repeated_calls")
STAGE_COLUMNS = 32  # stages of one root operation whose self time is recorded
log = logging.getLogger(__name__)


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

    def __init__(self, trees: list, max_samples: int) -> None:
        """``trees``: scikit-learn's fitted ``Tree`` objects."""
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
        self.norm = count * float(_average_path_length([max_samples])[0])

    _ARRAYS = ("feature", "threshold", "left", "right", "leaf_length", "roots")

    def arrays(self) -> dict[str, np.ndarray]:
        """The trees as arrays (a model file keeps them: no refit, nothing unpickled)."""
        return {**{name: getattr(self, name) for name in self._ARRAYS},
                "shape": np.array([self.levels, self.norm])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "_StackedTrees":
        trees = cls.__new__(cls)
        for name in cls._ARRAYS:
            setattr(trees, name, arrays[name].astype(np.intp if name in ("feature", "left", "right", "roots")
                                                     else float))
        nodes = len(trees.feature)
        if not all(len(trees.__dict__[name]) == nodes for name in ("threshold", "left", "right", "leaf_length")):
            raise ValueError("forest trees of unequal lengths")
        if ((trees.left >= nodes).any() or (trees.right >= nodes).any() or ((trees.left >= 0) & (trees.right < 0)).any()
                or not ((trees.roots >= 0) & (trees.roots < nodes)).all()):
            raise ValueError("forest trees that point outside themselves")
        levels, norm = arrays["shape"]
        trees.levels, trees.norm = int(levels), float(norm)
        return trees

    def score_samples(self, rows: np.ndarray) -> np.ndarray:
        """Same as ``IsolationForest.score_samples`` (lower = more anomalous)."""
        rows = np.ascontiguousarray(rows, dtype=float)
        if _forest is None:
            lengths = self.path_lengths(rows)
        else:
            lengths = np.empty(len(rows))
            _forest.path_lengths(self.feature, self.threshold, self.left, self.right, self.leaf_length, self.roots,
                                 self.levels, rows, lengths)
        return -np.power(2.0, -lengths / self.norm)

    def path_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Per row, the path lengths summed over the trees: the reference for ``_forest.c``
        and the walk where it is not built."""
        values = rows.ravel()
        row_starts = (np.arange(len(rows), dtype=np.intp) * rows.shape[1])[None, :]
        node = np.repeat(self.roots[:, None], len(rows), axis=1)  # (trees, rows): flat node numbers
        for _ in range(self.levels):
            left = self.left.take(node)
            go_left = values.take(row_starts + self.feature.take(node)) <= self.threshold.take(node)
            node = np.where(left < 0, node, np.where(go_left, left, self.right.take(node)))
        # summed tree after tree, as the C walk does: a sum over axis 0 is pairwise
        # when that axis is contiguous (a single row), and rounds differently
        return self.leaf_length.take(node).cumsum(axis=0)[-1]


def stage_label(stage: Stage) -> str:
    service, operation, kind = stage
    return f"self_time_ms[{service} '{operation}' {KIND_NAMES[kind]}]"


def stage_totals(keys: list[Stage], samples: list[int | None], index: dict[Stage, int], width: int) -> list[int]:
    """A row's stage columns: per column, the sum of one stage's samples; a stage
    new to ``index`` takes the next column while there is one, later ones are left
    out. The reference for ``_rows.stage_totals``."""
    totals = [0] * width
    for stage, self_ns in zip(keys, samples):
        if self_ns is None:
            continue
        column = index.get(stage)
        if column is None:
            if len(index) >= width:
                continue
            column = index[stage] = len(index)
        totals[column] += self_ns
    return totals


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
        self.trees_: _StackedTrees | None = None
        self.background: Executor | None = None  # where fits run (live); None: where they are due
        self._fitting: Future | None = None
        self.columns_: np.ndarray | None = None
        self.feature_names_: list[str] = []
        self.column_stages_: list[Stage | None] = []  # the stage of each stage feature (None: generic)
        self.threshold_ = -math.inf
        self.median_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self._generic = len(GENERIC_FEATURES)

    @property
    def fitted(self) -> bool:
        return self.trees_ is not None

    def fitted_state(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        """What the last fit set, as (JSON-ready values, arrays), for a model file:
        a loaded forest is then the one in memory (a refit on load would fit the
        buffer as it is now, not as it was at the fit). None before the first fit."""
        if self.trees_ is None:
            return None
        values = {"feature_names": self.feature_names_, "column_stages": self.column_stages_,
                  "threshold": self.threshold_}
        arrays = {"columns": self.columns_, "median": self.median_, "scale": self.scale_,
                  "z_threshold": self.z_threshold_, **{f"trees_{k}": v for k, v in self.trees_.arrays().items()}}
        return values, arrays

    def restore_fitted(self, values: dict, arrays: dict[str, np.ndarray]) -> None:
        columns = arrays["columns"].astype(np.intp)
        width = self.reservoir_.shape[1]
        if len(columns) != len(values["feature_names"]) or ((columns < 0) | (columns >= width)).any():
            raise ValueError("forest columns that do not fit its rows")
        trees = _StackedTrees.from_arrays({k[len("trees_"):]: v for k, v in arrays.items() if k.startswith("trees_")})
        if len(trees.feature) and trees.feature.max() >= len(columns):
            raise ValueError("forest trees that split on a column the forest does not have")
        self._apply({"columns_": columns, "feature_names_": [str(n) for n in values["feature_names"]],
                     "column_stages_": [None if s is None else (str(s[0]), str(s[1]), int(s[2]))
                                        for s in values["column_stages"]],
                     "threshold_": float(values["threshold"]), "median_": arrays["median"],
                     "scale_": arrays["scale"], "z_threshold_": arrays["z_threshold"], "trees_": trees})

    def row(self, trace: Trace) -> list[float]:
        """The trace's raw feature values in this forest's layout (stage times in ns):
        a plain list, made into arrays a batch at a time by ``matrix``."""
        root = trace.root
        features = shape(trace)
        generic = [math.log(max(root.end - root.start, 1) / 1e6)] + [features[name] for name in GENERIC_FEATURES[1:]]
        if not self.with_stages:
            return generic
        generic.extend(in_c("stage_totals", stage_totals, latency_keys(trace), latency_samples(trace),
                            self.stage_index_, STAGE_COLUMNS))
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
        fitted = self.trees_ is not None or self._fitting is not None
        if not warm or (fitted and self.since_fit_ < self.config.refit_every):
            return
        if self.background is None:
            self.fit()
            return
        # A fit due again before the one before was taken in (no batch of this root
        # operation came between): that one goes in first, as in place they would follow.
        self.settle()
        self.since_fit_ = 0
        self._fitting = self.background.submit(_fit, self, self.reservoir_[: self.filled_].copy(),
                                               dict(self.stage_index_))

    def settle(self) -> None:
        """Takes a background fit in before a batch is scored (waiting for it if it is not done)."""
        if self._fitting is not None:
            fitting, self._fitting = self._fitting, None
            self._apply(fitting.result())

    def fit(self) -> None:
        """Fits on the buffer now."""
        self._apply(_fit(self, self.reservoir_[: self.filled_], self.stage_index_))
        self.since_fit_ = 0

    def _apply(self, fitted: dict) -> None:
        for name, value in fitted.items():
            setattr(self, name, value)

    def _one_sided_z(self, features: np.ndarray) -> np.ndarray:
        return _one_sided_z(features, self.median_, self.scale_, self._generic)

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


def _one_sided_z(features: np.ndarray, median: np.ndarray, scale: np.ndarray, generic: int) -> np.ndarray:
    """Robust z of each feature, only upwards: every feature is worse when
    higher (slower, bigger, more errors, more repeats); a fast or small trace
    is not an anomaly. Absent stages count as no deviation."""
    z = np.maximum((features - median) / scale, 0.0)
    z[:, generic:] = np.where(features[:, generic:] > 0, z[:, generic:], 0.0)
    return z


_MAX_INT = np.iinfo(np.int32).max
_TREE_ARRAYS = ("feature", "threshold", "children_left", "children_right", "n_node_samples")
_CHECKED_TREES = 8  # grown both ways at the first fit: tree i has the same draws whatever the count
_direct_growth: bool | None = None  # whether _grow_directly grows the estimator's trees (None: not checked yet)


def _isolation_forest() -> type[IsolationForest]:
    """scikit-learn's forest, imported at the first fit: a replay that loads fitted forests
    (model files hold the trees) does not pay its ~0.6 s of imports until it refits."""
    from sklearn.ensemble import IsolationForest

    return IsolationForest


def _max_samples(rows: int) -> int:
    """Rows each tree is grown on (scikit-learn's "auto")."""
    return min(256, rows)


def _estimator_trees(features: np.ndarray, n_estimators: int, seed: int) -> list:
    """The fitted ``Tree`` objects of ``IsolationForest`` itself: the reference."""
    estimator = _isolation_forest()(n_estimators=n_estimators, max_samples=_max_samples(len(features)),
                                    random_state=seed).fit(features)
    return [tree.tree_ for tree in estimator.estimators_]


def _grow_directly(features: np.ndarray, n_estimators: int, seed: int) -> list:
    """The trees ``IsolationForest(n_estimators, max_samples=min(256, n), random_state=seed)
    .fit(features)`` grows, grown by the same tree builder and the same random draws,
    without the estimator around it: 15-25 ms instead of 120-160 ms for 100 trees.

    Nearly all of ``IsolationForest.fit`` is per-tree Python (cloning an estimator,
    validating its parameters and input, and three ``RandomState(seed)`` of 0.13 ms
    each); one ``RandomState`` re-seeded (``seed()`` is 2 µs) gives the same draws.
    It uses scikit-learn's private tree classes, so ``_grow`` checks it against the
    estimator once per process before it is trusted.
    """
    from sklearn.tree._criterion import MSE
    from sklearn.tree._splitter import RandomSplitter
    from sklearn.tree._tree import DepthFirstTreeBuilder, Tree
    from sklearn.utils.random import sample_without_replacement

    features = np.asarray(features, dtype=np.float32)
    count, width = features.shape
    max_samples = _max_samples(count)
    max_depth = int(np.ceil(np.log2(max(max_samples, 2))))
    random = np.random.RandomState(seed)
    target = random.uniform(size=count).reshape(-1, 1)  # IsolationForest's random y
    random.seed(seed)
    seeds = random.randint(_MAX_INT, size=n_estimators)  # the bagging's seeds
    trees = []
    for tree_seed in seeds:
        random.seed(tree_seed)
        splitter_seed = random.randint(_MAX_INT)  # what the bagging sets as the tree's random_state
        random.seed(tree_seed)
        sample_without_replacement(width, width, random_state=random)  # the features drawn (all)
        rows = sample_without_replacement(count, max_samples, random_state=random)
        weights = np.bincount(rows, minlength=count).astype(np.float64)  # the rows drawn, as weights
        random.seed(splitter_seed)
        splitter = RandomSplitter(MSE(1, count), 1, 1, 0.0, random, None)
        tree = Tree(width, np.ones(1, dtype=np.intp), 1)
        DepthFirstTreeBuilder(splitter, 2, 1, 0.0, max_depth, 0.0).build(tree, features, target, weights, None)
        trees.append(tree)
    return trees


def _grow(features: np.ndarray, n_estimators: int, seed: int) -> list:
    """The fitted trees of ``IsolationForest(n_estimators, max_samples=min(256, n),
    random_state=seed)`` on ``features``: by ``_grow_directly`` once, at the first
    fit of the process, its first trees on that fit's data were the very trees the
    estimator grows; by the estimator where they were not (another scikit-learn
    version, whose private classes changed), with a warning."""
    global _direct_growth
    if _direct_growth is None:
        _direct_growth = _grows_like_the_estimator(features, seed)
    return (_grow_directly if _direct_growth else _estimator_trees)(features, n_estimators, seed)


def _grows_like_the_estimator(features: np.ndarray, seed: int) -> bool:
    reference = _estimator_trees(features, _CHECKED_TREES, seed)
    try:
        direct = _grow_directly(features, _CHECKED_TREES, seed)
    except Exception as exc:  # private classes of another version: whatever they raise
        log.warning("forest fits use IsolationForest (7x slower): growing its trees directly failed "
                    "with this scikit-learn: %s", exc)
        return False
    if len(direct) == _CHECKED_TREES and all(np.array_equal(getattr(a, name), getattr(b, name))
                                             for a, b in zip(reference, direct) for name in _TREE_ARRAYS):
        return True
    log.warning("forest fits use IsolationForest (7x slower): this scikit-learn grows other trees "
                "than its tree builder called directly")
    return False


def _fit(forest: RootForest, data: np.ndarray, stage_index: dict[Stage, int]) -> dict:
    """What a fit on ``data`` sets on ``forest`` (read only here, so it may run on another thread)."""
    config = forest.config
    columns = list(range(len(GENERIC_FEATURES)))
    names = list(GENERIC_FEATURES)
    column_stages: list[Stage | None] = [None] * len(columns)
    if forest.with_stages and config.top_stages:
        base = len(GENERIC_FEATURES)
        by_index = {column: stage for stage, column in stage_index.items()}
        weight = data[:, base: base + len(by_index)].mean(axis=0)
        for column in np.argsort(-weight, kind="stable")[: config.top_stages]:
            columns.append(base + int(column))
            names.append(stage_label(by_index[int(column)]))
            column_stages.append(by_index[int(column)])
    chosen = np.asarray(columns)
    features = data[:, chosen]
    trees = _StackedTrees(_grow(features, config.n_estimators, config.seed), _max_samples(len(features)))
    # Robust centre and scale per feature. A stage's self time is judged
    # among the traces that have the stage: whether it is there at all is
    # structure (missing_expected_span), and an optional branch would
    # otherwise look like a huge deviation every time it is taken.
    generic = len(GENERIC_FEATURES)
    median = np.median(features, axis=0)
    mad = np.median(np.abs(features - median), axis=0) * 1.4826
    for column in range(generic, features.shape[1]):
        present = features[:, column][features[:, column] > 0]
        if len(present):
            median[column] = np.median(present)
            mad[column] = np.median(np.abs(present - median[column])) * 1.4826
    # Counts move in whole steps: one more error or retry is one unit, not
    # "infinitely many MADs" when most traces have none. Log features: 0.25.
    floor = np.full(features.shape[1], 0.25)
    floor[1:generic] = 1.0
    scale = np.maximum(mad, floor)
    # Per-feature deviation threshold from the buffer's own tail (heavy
    # tails get a higher bar than min_feature_z), as slow_stage does.
    z = _one_sided_z(features, median, scale, generic)
    reference = tail_reference(len(z))
    q_ref = np.quantile(z, reference, axis=0)
    excess = np.where(z > q_ref, z - q_ref, 0.0).sum(axis=0) / np.maximum((z > q_ref).sum(axis=0), 1)
    tail = exponential_tail(q_ref, excess, forest.alert_rate / max(SHARE, z.shape[1]), reference)
    # Stage times get min_feature_z only: a stall or two in the buffer would
    # inflate their tail, and what a stage does too rarely for this buffer to
    # show is judged against its latency history instead (TraceOutlier).
    z_threshold = np.maximum(tail, config.min_feature_z)
    z_threshold[generic:] = config.min_feature_z
    return {"columns_": chosen, "feature_names_": names, "column_stages_": column_stages, "trees_": trees,
            "threshold_": float(np.quantile(trees.score_samples(features), config.score_quantile)),
            "median_": median, "scale_": scale, "z_threshold_": z_threshold}


class ForestModel:
    """All forests: one per root operation (up to ``max_root_operations``) and the shared one."""

    def __init__(self, config: ForestConfig, alert_rate: float = 1e-4) -> None:
        self.config = config
        self.alert_rate = alert_rate
        self.forests_: dict[tuple[str, str], RootForest] = {}
        self.shared_ = RootForest(config, with_stages=False, alert_rate=alert_rate)
        self._background: Executor | None = None

    def fit_in_background(self) -> None:
        """From now on fits run on one thread of their own (live: they must not stall decisions).
        scikit-learn is imported now, at start-up: imported by the first fit, on the fit
        thread, its 0.5-1 s of imports would hold the interpreter lock from the decisions."""
        if self._background is None:
            _isolation_forest()
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forest-fit")
        for forest in (*self.forests_.values(), self.shared_):
            forest.background = self._background

    def forest_for(self, key: tuple[str, str]) -> RootForest | None:
        forest = self.forests_.get(key)
        if forest is None and len(self.forests_) < self.config.max_root_operations:
            forest = self.forests_[key] = RootForest(self.config, with_stages=True, alert_rate=self.alert_rate)
            forest.background = self._background
        return forest
