"""The learned detectors on synthetic event-time streams (fixed seeds, no sleeping)."""

import hashlib
import subprocess
import sys
import json

import numpy as np
import pytest

from builders import MS, T0, row
from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig
from traceguard.models import forest as forest_module, store
from traceguard.models.store import ModelFileError
from traceguard.pipeline import Pipeline
from traceguard.records import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER
from traceguard.sinks import MemorySink

MINUTE_MS = 60_000
DB = ("db.system", "postgresql"),
DB_STAGE = ("api", "SELECT item", KIND_CLIENT)


def request(n: int, t_ms: float, rng, *, db_factor=1.0, speed=1.0, repeats=1, cache=None, render=True,
            status=0):
    """One request: api SERVER → lookup (INTERNAL) → [cache GET] + SELECT item × repeats, then render;
    ``status``: the SERVER span's."""
    def d(median_ms):
        return median_ms * speed * float(np.exp(rng.normal(0, 0.3)))

    rows = []
    cursor = t_ms + d(0.2)
    lookup_start = cursor
    if cache if cache is not None else rng.random() < 0.35:
        end = cursor + d(0.4)
        rows.append(row(n, 10, 2, start_ms=cursor, end_ms=end, kind=KIND_CLIENT, service="api", name="GET cache",
                        attrs=(("db.system", "redis"),)))
        cursor = end
    for k in range(repeats):
        end = cursor + d(4.0) * db_factor
        rows.append(row(n, 20 + k, 2, start_ms=cursor, end_ms=end, kind=KIND_CLIENT, service="api",
                        name="SELECT item", attrs=DB))
        cursor = end
    cursor += d(0.1)
    rows.append(row(n, 2, 1, start_ms=lookup_start, end_ms=cursor, kind=KIND_INTERNAL, service="api", name="lookup"))
    if render:
        end = cursor + d(1.0)
        rows.append(row(n, 3, 1, start_ms=cursor, end_ms=end, kind=KIND_INTERNAL, service="api", name="render"))
        cursor = end
    rows.append(row(n, 1, start_ms=t_ms, end_ms=cursor + d(0.2), kind=KIND_SERVER, service="api", name="GET /item",
                    status=status))
    return rows


def stream(minutes: float, *, rate_per_s=1.0, seed=1, start_ms=0.0, pipeline=None, first_n=0, **kinds):
    """Feeds ``minutes`` of requests; ``kinds`` maps request keyword arguments to a function of the minute.
    With ``pipeline`` given, findings go to that pipeline's sinks, not to the returned one."""
    rng = np.random.default_rng(seed)
    sink = MemorySink()
    pipeline = pipeline or Pipeline(PipelineConfig(), EventTimeClock(5 * 10**9), [sink])
    count = int(minutes * 60 * rate_per_s)
    for i in range(count):
        t_ms = start_ms + i * 1000 / rate_per_s
        arguments = {key: value(t_ms / MINUTE_MS) for key, value in kinds.items()}
        pipeline.accept_spans(request(first_n + i, t_ms, rng, **arguments))
        pipeline.advance()
    return pipeline, sink


def of_kind(sink, kind):
    return [a for a in sink.anomalies if a.kind.value == kind]


def test_two_stationary_hours_raise_no_learned_finding():
    pipeline, sink = stream(120)
    pipeline.close()
    assert of_kind(sink, "latency_regression") == []
    assert of_kind(sink, "missing_expected_span") == []
    assert len(of_kind(sink, "trace_outlier")) <= 2  # 7,200 traces: a couple of tails at most
    stage = pipeline.models.latency.stages_[DB_STAGE]
    assert stage.self_hist.total > 7000 * 0.9


@pytest.mark.parametrize("factor, within_minutes", [(3.0, 5), (1.5, 15)])
def test_a_shift_is_found_in_time_and_closed_when_it_ends(factor, within_minutes):
    onset_min, end_min = 60, 90
    pipeline, sink = stream(120, db_factor=lambda m: factor if onset_min <= m < end_min else 1.0)
    pipeline.close()
    found = of_kind(sink, "latency_regression")
    opened = [a for a in found if a.evidence["state"] == "open"]
    assert len(opened) == 1, [a.summary for a in found]
    (regression,) = opened
    onset_ns = T0 + onset_min * MINUTE_MS * 10**6
    assert (regression.service, regression.operation) == ("api", "SELECT item")
    assert regression.detected_at - onset_ns <= within_minutes * 60 * 10**9
    assert abs(regression.evidence["onset_unix_nano"] - onset_ns) <= 2 * 60 * 10**9
    assert factor * 0.8 <= regression.evidence["magnitude"] <= factor * 1.2
    assert regression.exemplars and regression.trace_id is None
    assert regression.evidence["baseline"]["p50_ms"] < regression.evidence["current"]["p50_ms"]
    (resolved,) = [a for a in found if a.evidence["state"] == "resolved"]
    assert resolved.id == regression.id
    assert resolved.evidence["resolved_at_unix_nano"] >= T0 + end_min * MINUTE_MS * 10**6
    # the parent stages only look slow: their self time did not move
    assert {a.operation for a in found} == {"SELECT item"}


def test_the_baseline_does_not_absorb_an_open_regression():
    pipeline, sink = stream(60)
    before = float(np.exp(pipeline.models.latency.stages_[DB_STAGE].self_hist.quantiles([0.5])[0]))
    stream(90, pipeline=pipeline, start_ms=60 * MINUTE_MS, first_n=10**6, db_factor=lambda m: 3.0)
    after = float(np.exp(pipeline.models.latency.stages_[DB_STAGE].self_hist.quantiles([0.5])[0]))
    assert after == pytest.approx(before, rel=0.1)
    assert pipeline.models.latency.stages_[DB_STAGE].regression is not None
    opened = of_kind(sink, "latency_regression")
    assert [a.evidence["state"] for a in opened] == ["open"]


def _pods_stream(minutes: float, slow_pods: set[int], factor: float, *, rate_per_s: float = 0.5, pods: int = 3,
                 config: PipelineConfig | None = None, replaced_every: float | None = None):
    """Requests spread over ``pods`` replicas of the api (its spans carry the pod); the
    database calls of ``slow_pods`` are ``factor`` times slower from minute 60 to 90.
    ``replaced_every`` (minutes): every pod is replaced by a new one (a new name) this often."""
    rng = np.random.default_rng(3)
    sink = MemorySink()
    pipeline = Pipeline(config or PipelineConfig(), EventTimeClock(5 * 10**9), [sink])
    for i in range(int(minutes * 60 * rate_per_s)):
        t_ms = i * 1000 / rate_per_s
        pod = int(rng.integers(pods))
        slow = pod in slow_pods and 60 <= t_ms / MINUTE_MS < 90
        rows = request(i, t_ms, rng, db_factor=factor if slow else 1.0)
        generation = f"{int(t_ms / MINUTE_MS // replaced_every)}-" if replaced_every else ""
        for span_row in rows:
            span_row.instance = f"api-{generation}{pod}"
        pipeline.accept_spans(rows)
        pipeline.advance()
    pipeline.close()
    return pipeline, of_kind(sink, "latency_regression")


def test_one_slow_pod_of_three_is_found_and_named():
    """Each pod sees five database calls a window (pooled until there are enough).
    (The stage's own test may see the shift too: here its spread is narrow.)"""
    pipeline, found = _pods_stream(120, {1}, 4.0)
    by_pod = [a for a in found if a.evidence.get("instance") is not None]
    opened = [a for a in by_pod if a.evidence["state"] == "open"]
    assert [(a.operation, a.evidence["instance"]) for a in opened] == [("SELECT item", "api-1")]
    (regression,) = opened
    assert "on pod api-1" in regression.summary
    onset_ns = T0 + 60 * MINUTE_MS * 10**6
    assert abs(regression.evidence["onset_unix_nano"] - onset_ns) <= 2 * 60 * 10**9
    assert 3.0 <= regression.evidence["magnitude"] <= 5.0
    (resolved,) = [a for a in by_pod if a.evidence["state"] == "resolved"]
    assert resolved.id == regression.id and resolved.evidence["resolved_at_unix_nano"] >= onset_ns + 30 * 60 * 10**9
    # the pods' windows are judged against the stage's baseline, which only the stage's windows teach
    assert pipeline.models.pod_latency.model.stages_[(*DB_STAGE, "api-1")].self_hist is \
        pipeline.models.latency.stages_[DB_STAGE].self_hist


def test_every_pod_slower_is_the_stage_s_regression_and_names_no_pod():
    _, found = _pods_stream(120, {0, 1, 2}, 3.0)
    opened = [a for a in found if a.evidence["state"] == "open"]
    assert [(a.operation, a.evidence.get("instance")) for a in opened] == [("SELECT item", None)]


def test_a_stage_one_pod_serves_keeps_no_pod_windows():
    pipeline, found = _pods_stream(40, set(), 1.0, pods=1)
    assert found == [] and pipeline.models.pod_latency.model.stages_ == {}


def test_pods_replaced_all_day_make_room_for_the_new_ones():
    """Rolling restarts: 3 pods replaced every 2 minutes, 180 pod names in 2 hours. A
    stage keeps windows for 64 pods; one idle for 20 windows makes room for a new one."""
    pipeline, found = _pods_stream(120, set(), 1.0, replaced_every=2)
    pods = pipeline.models.pod_latency
    assert found == [] and pods.model.untracked_samples_ == 0
    assert len(pods.pods_[DB_STAGE]) <= 64 and {"api-59-0", "api-59-1", "api-59-2"} <= pods.pods_[DB_STAGE]
    assert len([key for key in pods.model.stages_ if key[:3] == DB_STAGE]) == len(pods.pods_[DB_STAGE])


def test_a_single_replica_renamed_by_restarts_is_the_service_not_an_odd_pod():
    """One pod, replaced every 25 minutes; the slowdown from minute 60 is the service's:
    the new pod has no live peer to differ from."""
    _, found = _pods_stream(120, {0}, 3.0, pods=1, replaced_every=25)
    assert [a.evidence.get("instance") for a in found if a.evidence["state"] == "open"] == [None]


def test_a_slow_pod_that_is_replaced_has_its_regression_resolved():
    """The slow pod (api-2-1) is replaced at minute 75 while still slow: no sample will
    close its regression, so it is resolved once the pod has been quiet for 20 windows,
    at the end of its last window; its replacement (api-3-1, slow too) opens its own."""
    _, found = _pods_stream(120, {1}, 4.0, replaced_every=25)
    by_pod = [a for a in found if a.evidence.get("instance")]
    assert sorted((a.evidence["instance"], a.evidence["state"]) for a in by_pod) == [
        ("api-2-1", "open"), ("api-2-1", "resolved"), ("api-3-1", "open"), ("api-3-1", "resolved")]
    (gone,) = [a for a in by_pod if a.evidence["instance"] == "api-2-1" and a.evidence["state"] == "resolved"]
    assert gone.evidence["resolved_at_unix_nano"] <= T0 + 76 * MINUTE_MS * 10**6


def test_contract_pod_windows_are_bounded_by_max_stages():
    from traceguard.config import LatencyConfig, LearnedConfig

    config = PipelineConfig(learned=LearnedConfig(latency=LatencyConfig(max_stages=4)))
    pipeline, _ = _pods_stream(10, set(), 1.0, config=config)
    pods = pipeline.models.pod_latency
    assert len(pods.model.stages_) == 4 and len(pods.pods_) == 4 and pods.model.untracked_samples_ > 0
    assert pipeline.metrics.get("traceguard_latency_untracked_samples_total") >= pods.model.untracked_samples_


def test_slow_stage_points_at_the_guilty_span_not_its_parents():
    pipeline, sink = stream(30, rate_per_s=3.0)  # 5,400 traces: slow_stage judges after 5,000 samples
    rng = np.random.default_rng(5)
    pipeline.accept_spans(request(10**7, 30 * MINUTE_MS, rng, db_factor=60.0, cache=False))
    pipeline.close()
    slow = of_kind(sink, "slow_stage")
    assert [(a.operation, a.trace_id[-6:]) for a in slow] == [("SELECT item", f"{10**7:032x}"[-6:])]
    assert slow[0].evidence["self_time_ms"] > slow[0].evidence["threshold_ms"]


def test_optional_branches_are_not_expected_but_constant_stages_are():
    pipeline, sink = stream(10)  # GET cache in ~35 % of requests: optional
    assert of_kind(sink, "missing_expected_span") == []
    rng = np.random.default_rng(9)
    pipeline.accept_spans(request(10**7, 10 * MINUTE_MS, rng, cache=False, render=False))
    # a failed request skips what comes after its failure: not a missing span
    pipeline.accept_spans(request(10**7 + 1, 10 * MINUTE_MS + 1, rng, cache=False, render=False, status=2))
    pipeline.close()
    (missing,) = of_kind(sink, "missing_expected_span")
    assert [s["operation"] for s in missing.evidence["missing_stages"]] == ["render"]
    assert missing.span_id == (1).to_bytes(8, "big").hex()


def test_no_learned_finding_during_warm_up():
    config = PipelineConfig()
    sink = MemorySink()
    pipeline = Pipeline(config, EventTimeClock(5 * 10**9), [sink])
    pipeline, sink = stream(1, pipeline=pipeline, render=lambda m: False)  # 60 traces, all without render
    rng = np.random.default_rng(3)
    pipeline.accept_spans(request(10**7, MINUTE_MS, rng, repeats=40, db_factor=50))
    pipeline.close()
    assert {a.kind.value for a in sink.anomalies} == set()


def test_n_plus_one_and_whole_trace_slowdowns_are_outliers_with_their_reasons():
    # 5,400 normal traces: the forest is fitted, and the latency history that
    # confirms a slow trace has measured its tail (slow_stage_min_samples)
    pipeline, sink = stream(90)
    rng = np.random.default_rng(4)
    pipeline.accept_spans(request(10**7, 90 * MINUTE_MS, rng, repeats=30, cache=False))
    pipeline.accept_spans(request(10**7 + 1, 90 * MINUTE_MS + 500, rng, speed=20.0))
    pipeline.close()
    outliers = {a.trace_id: a for a in of_kind(sink, "trace_outlier")}
    n_plus_one = outliers[f"{10**7:032x}"]
    assert "max_repeated_calls" in [f["feature"] for f in n_plus_one.evidence["features"]]
    slow = outliers[f"{10**7 + 1:032x}"]
    assert slow.evidence["features"][0]["feature"] in ("duration_ms",) or "self_time_ms" in slow.evidence["features"][0]["feature"]
    assert len(outliers) <= 3


def test_a_judge_that_hands_over_has_the_forest_score_its_batch_first():
    pipeline, sink = stream(90)
    rng = np.random.default_rng(4)
    pipeline.accept_spans(request(10**7, 90 * MINUTE_MS, rng, repeats=30, cache=False))
    for second in (5, 20, 33, 36):  # the clock passes its decision, not yet its batch's max_delay
        stream(1 / 60, start_ms=90 * MINUTE_MS + second * 1000, first_n=10**8 + second, pipeline=pipeline)
    held = pipeline.batched()
    assert held and f"{10**7:032x}" not in {a.trace_id for a in of_kind(sink, "trace_outlier")}
    pipeline.score_batches()
    assert pipeline.batched() == 0
    assert f"{10**7:032x}" in {a.trace_id for a in of_kind(sink, "trace_outlier")}


def _trained(tmp_path):
    pipeline, _ = stream(20)
    pipeline.close()
    store.save(pipeline.models_for_saving(), tmp_path)
    return pipeline.models


def test_model_files_round_trip(tmp_path):
    models = _trained(tmp_path)
    loaded = store.load(tmp_path, PipelineConfig().learned)
    assert set(loaded.latency.stages_) == set(models.latency.stages_)
    np.testing.assert_array_equal(loaded.latency.stages_[DB_STAGE].self_hist.counts_,
                                  models.latency.stages_[DB_STAGE].self_hist.counts_)
    assert loaded.latency.stages_[DB_STAGE].slow_threshold == models.latency.stages_[DB_STAGE].slow_threshold
    root = ("api", "GET /item")
    assert loaded.structure.roots_[root].stages == models.structure.roots_[root].stages
    before, after = models.forest.forests_[root], loaded.forest.forests_[root]
    rows = before.reservoir_[:50]
    np.testing.assert_allclose(after.score(rows)[0], before.score(rows)[0])
    assert after.threshold_ == pytest.approx(before.threshold_)
    # the rate detectors' learned rates, keyed by kind, start the next pipeline
    assert loaded.rates == json.loads(json.dumps(models.rates)) and "error_regression" in loaded.rates
    saved = json.loads(json.dumps(loaded.rates))
    again = Pipeline(PipelineConfig(), EventTimeClock(5 * 10**9), [MemorySink()], models=loaded)
    assert json.loads(json.dumps(again.models_for_saving().rates)) == saved  # with the incident tracker's burst rates


def test_a_saved_forest_is_the_one_in_memory_and_saving_changes_nothing(tmp_path):
    """A snapshot must not change what a running process finds after it (it refitted
    forests that had new rows, at a time an uninterrupted run would not), and a
    process that loads it must go on as the one that saved it would, refits included."""
    pipeline, _ = stream(20)
    root = ("api", "GET /item")
    forest = pipeline.models.forest.forests_[root]
    rng = np.random.default_rng(5)
    since = forest.since_fit_ + 7
    for kept in forest.reservoir_[rng.integers(0, forest.filled_, 7)]:
        forest.add(kept.copy())  # rows since the last fit: a refit would change the forest
    assert 7 <= forest.since_fit_ == since < forest.config.refit_every
    rows = forest.reservoir_[:50].copy()
    scores, threshold = forest.score(rows)[0], forest.threshold_
    store.save(pipeline.models_for_saving(), tmp_path)
    assert forest.since_fit_ == since and forest.threshold_ == threshold
    np.testing.assert_array_equal(forest.score(rows)[0], scores)
    loaded = store.load(tmp_path, PipelineConfig().learned).forest.forests_[root]
    np.testing.assert_array_equal(loaded.score(rows)[0], scores)
    assert (loaded.next_, loaded.since_fit_, loaded.threshold_) == (forest.next_, since, threshold)
    more = forest.reservoir_[rng.integers(0, forest.filled_, forest.config.refit_every)].copy()
    for kept in more:  # both refit once, on the same rows in the same order
        forest.add(kept.copy())
        loaded.add(kept.copy())
    assert loaded.since_fit_ == forest.since_fit_ < since + len(more)  # refitted
    np.testing.assert_array_equal(loaded.score(rows)[0], forest.score(rows)[0])


def test_a_version_2_model_file_is_read_and_its_forests_refitted(tmp_path):
    models = _trained(tmp_path)
    forests = list(models.forest.forests_.items())
    oldest_first = {f"rows_{i}": np.roll(f.reservoir_[: f.filled_], -f.next_ if f.filled_ == len(f.reservoir_) else 0,
                                         axis=0) for i, (_, f) in enumerate(forests)}
    meta = [{"root": list(key), "stages": [[*stage, column] for stage, column in f.stage_index_.items()]}
            for key, f in forests]
    shared = models.forest.shared_
    np.savez_compressed(tmp_path / "forest.npz", meta=np.array(json.dumps(meta)),
                        shared=shared.reservoir_[: shared.filled_], **oldest_first)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = 2
    manifest["files"]["forest.npz"] = hashlib.sha256((tmp_path / "forest.npz").read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = store.load(tmp_path, PipelineConfig().learned).forest.forests_[("api", "GET /item")]
    assert loaded.fitted and loaded.filled_ == models.forest.forests_[("api", "GET /item")].filled_


def test_tampered_old_and_missing_model_files_are_refused(tmp_path):
    _trained(tmp_path)
    with open(tmp_path / "structure.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(ModelFileError, match="structure.json does not match its checksum"):
        store.load(tmp_path, PipelineConfig().learned)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = 0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="version 0, this traceguard reads versions 2, 3"):
        store.load(tmp_path, PipelineConfig().learned)
    with pytest.raises(ModelFileError, match="no manifest.json"):
        store.load(tmp_path / "nowhere", PipelineConfig().learned)


def _interpolated_quantiles(counts: np.ndarray, qs) -> np.ndarray:
    """The quantiles of a LogHistogram as whole-array numpy (bins, then linear within one)."""
    from traceguard.models.histogram import BIN_WIDTH, BINS, LOG_LOW

    qs = np.asarray(qs, dtype=float)
    cumulative = np.cumsum(counts)
    targets = qs * counts.sum()
    index = np.minimum(np.searchsorted(cumulative, targets, side="left"), BINS - 1)
    before = np.where(index > 0, cumulative[index - 1], 0.0)
    within = np.divide(targets - before, counts[index], out=np.zeros_like(targets), where=counts[index] > 0)
    return LOG_LOW + (index + np.clip(within, 0, 1)) * BIN_WIDTH


def test_histogram_quantiles_are_the_whole_array_interpolation_bit_for_bit():
    from traceguard.models.histogram import BINS, LogHistogram

    rng = np.random.default_rng(5)
    assert np.isnan(LogHistogram().quantiles((0.5, 0.9))).all()
    for trial in range(3000):
        hist = LogHistogram()
        hist.add_logs(rng.normal(rng.uniform(8, 20), rng.uniform(0.01, 2), rng.integers(1, 3000)))
        if trial % 3 == 0:
            hist.decay(rng.uniform(0.3, 1))  # fractional counts
        if trial % 5 == 0:
            hist.counts_[rng.integers(0, BINS, 40)] = 0  # empty bins inside the body
        qs = tuple(rng.choice([0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 0.9999, 1.0, rng.uniform()], rng.integers(1, 6)))
        got = hist.quantiles(qs)
        assert got.dtype == np.float64 and got.tobytes() == _interpolated_quantiles(hist.counts_, qs).tobytes(), qs


def test_stacked_tree_scores_equal_scikit_learn():
    from sklearn.ensemble import IsolationForest

    pipeline, _ = stream(20)
    forest = pipeline.models.forest.forests_[("api", "GET /item")]
    rng = np.random.default_rng(0)
    fitted = forest.reservoir_[: forest.filled_][:, forest.columns_]
    estimator = IsolationForest(n_estimators=100, max_samples=min(256, len(fitted)), random_state=0).fit(fitted)
    rows = fitted[:300] * rng.uniform(0.5, 3.0, size=(min(300, len(fitted)), fitted.shape[1]))
    trees = forest_module._StackedTrees([e.tree_ for e in estimator.estimators_], estimator.max_samples_)
    np.testing.assert_allclose(trees.score_samples(rows), estimator.score_samples(rows), rtol=1e-12)


def _training_sets():
    """Buffers a forest may fit on: ties, a constant column, fewer rows than a tree
    samples, repeated rows, wide value ranges, a real reservoir."""
    rng = np.random.default_rng(3)
    ties = np.round(rng.normal(size=(900, 9)))
    constant = rng.normal(size=(400, 12))
    constant[:, 4] = 0.0
    few = rng.lognormal(size=(37, 7))
    repeated = np.repeat(rng.normal(size=(20, 5)), 30, axis=0)
    wide = rng.normal(size=(2000, 15)) * np.logspace(-6, 9, 15)
    pipeline, _ = stream(20)
    forest = pipeline.models.forest.forests_[("api", "GET /item")]
    return [ties, constant, few, repeated, wide, forest.reservoir_[: forest.filled_][:, forest.columns_]]


@pytest.mark.parametrize("seed", [0, 7])
def test_trees_grown_directly_are_the_trees_isolation_forest_grows(seed):
    """The fits call scikit-learn's tree builder without the estimator (7x faster); the
    findings depend on the trees, so they must be the estimator's, node for node."""
    from sklearn.ensemble import IsolationForest

    for features in _training_sets():
        estimator = IsolationForest(n_estimators=100, max_samples=min(256, len(features)),
                                    random_state=seed).fit(features)
        direct = forest_module._grow_directly(features, 100, seed)
        assert len(direct) == 100
        for reference, tree in zip((e.tree_ for e in estimator.estimators_), direct):
            for name in forest_module._TREE_ARRAYS:
                np.testing.assert_array_equal(getattr(tree, name), getattr(reference, name))
        trees = forest_module._StackedTrees(direct, min(256, len(features)))
        np.testing.assert_array_equal(trees.score_samples(features), estimator.score_samples(features))
        # what the first fit of a process checks: the first trees are the same whatever the count
        few = forest_module._grow_directly(features, forest_module._CHECKED_TREES, seed)
        assert all(np.array_equal(a.threshold, b.threshold) and np.array_equal(a.feature, b.feature)
                   for a, b in zip(few, direct))


def test_fits_go_through_isolation_forest_where_growing_directly_differs(monkeypatch, caplog):
    """Another scikit-learn version may change the private classes: then (checked at
    the first fit of the process) every fit uses the estimator, and a warning says so."""
    features = _training_sets()[1]
    reference = forest_module._grow_directly(features, 100, 0)
    for broken, said in ((lambda features, n, seed: reference[1: n + 1], "grows other trees"),
                         (lambda features, n, seed: reference[:n - 1], "grows other trees"),
                         (lambda features, n, seed: 1 / 0, "division by zero")):
        monkeypatch.setattr(forest_module, "_direct_growth", None)
        monkeypatch.setattr(forest_module, "_grow_directly", broken)
        caplog.clear()
        for _ in range(2):
            trees = forest_module._grow(features, 100, 0)
            assert all(np.array_equal(a.threshold, b.threshold) for a, b in zip(trees, reference))
        assert forest_module._direct_growth is False
        assert said in caplog.text and caplog.text.count("forest fits use IsolationForest") == 1



@pytest.mark.skipif(forest_module._forest is None, reason="the C tree walk is not built")
def test_the_c_tree_walk_sums_the_numpy_walks_path_lengths_bit_for_bit():
    """The scores (so the findings) must not depend on whether _forest.c is built."""
    pipeline, _ = stream(20)
    trees = pipeline.models.forest.forests_[("api", "GET /item")].trees_
    rng = np.random.default_rng(1)
    for count in (1, 7, 13, 256):  # the C walk takes rows 8 at a time
        rows = rng.normal(size=(count, int(trees.feature.max()) + 1)) * 3
        rows[0, 0] = np.nan  # goes right in both
        rows[count // 2] = np.nan
        c = trees.score_samples(rows)
        reference = -np.power(2.0, -trees.path_lengths(np.ascontiguousarray(rows)) / trees.norm)
        assert c.tobytes() == reference.tobytes()


@pytest.mark.skipif(forest_module._forest is None, reason="the C tree walk is not built")
def test_the_c_tree_walk_refuses_nodes_outside_the_trees():
    from traceguard import _forest

    one = np.zeros(1, dtype=np.intp)
    rows, out = np.zeros((2, 1)), np.empty(2)
    leaf = np.array([-1], dtype=np.intp)
    with pytest.raises(ValueError, match="a root outside the trees"):
        _forest.path_lengths(one, np.zeros(1), leaf, leaf, np.zeros(1), np.array([5], dtype=np.intp), 3, rows, out)
    with pytest.raises(ValueError, match="a child outside the trees"):
        _forest.path_lengths(one, np.zeros(1), np.array([9], dtype=np.intp), leaf, np.zeros(1), one, 3, rows, out)
    with pytest.raises(ValueError, match="a split on a column the rows do not have"):
        _forest.path_lengths(np.array([4], dtype=np.intp), np.zeros(1), one, one, np.zeros(1), one, 3, rows, out)
    with pytest.raises(TypeError, match="feature"):
        _forest.path_lengths(np.zeros(1), np.zeros(1), leaf, leaf, np.zeros(1), one, 3, rows, out)
    # a leaf's column is never read, whatever a model file says it is
    _forest.path_lengths(np.array([4], dtype=np.intp), np.zeros(1), leaf, leaf, np.full(1, 2.5), one, 3, rows, out)
    assert out.tolist() == [2.5, 2.5]
    with pytest.raises(ValueError, match="a row per out item"):
        _forest.path_lengths(one, np.zeros(1), leaf, leaf, np.zeros(1), one, 3, rows, np.empty(3))


def _findings_json(seed, background_fits=False):
    """A 3x shift and a few outliers, fed twice from scratch: the findings as JSON."""
    from traceguard.config import ForestConfig, LearnedConfig

    sink = MemorySink()
    # refits every 300 normal traces: several during the stream, so when they are taken in matters
    config = PipelineConfig(learned=LearnedConfig(forest=ForestConfig(refit_every=300)))
    pipeline = Pipeline(config, EventTimeClock(5 * 10**9), [sink])
    if background_fits:
        pipeline.models.forest.fit_in_background()
    stream(100, seed=seed, pipeline=pipeline, db_factor=lambda m: 3.0 if 60 <= m < 80 else 1.0,
           repeats=lambda m: 30 if int(m * 60) % 997 == 0 and m > 30 else 1)
    pipeline.close()
    return [a.model_dump_json() for a in sink.anomalies]


def test_contract_learned_detectors_are_deterministic():
    first, second = _findings_json(2), _findings_json(2)
    assert first == second
    assert {json.loads(a)["kind"] for a in first} >= {"latency_regression", "trace_outlier"}


def test_fits_in_the_background_give_the_findings_of_fits_in_place():
    """Live fits run on their own thread; each batch takes in the fits due before it,
    so the findings are those of fitting where each fit was due."""
    assert _findings_json(2, background_fits=True) == _findings_json(2)


def test_contract_learned_state_is_bounded():
    from traceguard.config import ForestConfig, LatencyConfig, LearnedConfig, StructureConfig

    config = PipelineConfig(learned=LearnedConfig(
        latency=LatencyConfig(max_stages=3, max_window_samples=16),
        structure=StructureConfig(max_root_operations=1, max_stages_per_root=2),
        forest=ForestConfig(max_root_operations=1, reservoir=60, warmup_traces=50, refit_every=100)))
    sink = MemorySink()
    pipeline = Pipeline(config, EventTimeClock(5 * 10**9), [sink])
    stream(30, pipeline=pipeline)
    models = pipeline.models
    assert len(models.latency.stages_) == 3 and models.latency.untracked_samples_ > 0
    assert all(len(s.window.self_ns) <= 16 for s in models.latency.stages_.values() if s.window)
    assert len(models.structure.roots_) == 1
    assert all(len(root.stages) <= 2 for root in models.structure.roots_.values())
    assert len(models.forest.forests_) == 1
    assert all(f.reservoir_.shape[0] == 60 for f in models.forest.forests_.values())


def test_self_time_counts_only_what_children_cover_within_the_span():
    """Children are clipped to their parent: one that starts after the parent
    ended (async work) covers nothing, overlapping ones count once."""
    from test_detectors import decide
    from traceguard.models.features import self_times

    lone = decide(row(1, 1, start_ms=0, end_ms=10), row(1, 2, 1, start_ms=12, end_ms=20))
    assert self_times(lone)[0] == 10 * MS
    several = decide(row(2, 1, start_ms=0, end_ms=10), row(2, 2, 1, start_ms=11, end_ms=15),
                     row(2, 3, 1, start_ms=2, end_ms=6), row(2, 4, 1, start_ms=4, end_ms=8))
    assert self_times(several)[0] == 4 * MS  # 2..8 covered; 11..15 is after the end
    one_inside = decide(row(3, 1, start_ms=0, end_ms=10), row(3, 2, 1, start_ms=3, end_ms=14))
    assert self_times(one_inside)[0] == 3 * MS


def test_a_run_of_windows_needs_more_samples_above_the_baseline_than_its_own_tail_makes():
    """The count test behind a regression: a quiet stage's two windows picked for
    leaning high (the false incident of a healthy run: 11 of 18 samples above
    the cut, where the baseline puts a quarter) are chance; a real 1.5x shift
    (18 of 23) is not."""
    from traceguard.config import LatencyConfig
    from traceguard.models.latency import LatencyModel, StageLatency

    model = LatencyModel(LatencyConfig())
    stage = StageLatency()
    rng = np.random.default_rng(3)
    baseline = np.log(0.5 * MS) + rng.normal(0.0, 0.4, 20_000)
    stage.self_hist.add_logs(baseline)
    median = float(np.median(baseline))
    cut = median + np.log(LatencyConfig().regression_min_ratio)
    assert stage.self_hist.share_above(cut) == pytest.approx(float(np.mean(baseline > cut)), abs=0.02)

    def run(above: int, n: int) -> np.ndarray:
        return np.sort(np.r_[np.full(above, cut + 0.2), np.full(n - above, median)])

    assert not model._beyond_chance(stage, run(11, 18), median)
    assert model._beyond_chance(stage, run(18, 23), median)


def test_a_background_refit_runs_while_traces_are_added_and_equals_a_fit_in_place():
    """Live, a refit runs on its own thread while decisions go on; the next batch
    takes it in, and it is what a fit where it was due gives."""
    import threading
    from concurrent.futures import Future

    pipeline, _ = stream(20)
    forest = pipeline.models.forest.forests_[("api", "GET /item")]
    before = forest.threshold_
    release, started = threading.Event(), threading.Event()

    class Held:  # an executor whose one fit waits until the test releases it
        def submit(self, fn, *args):
            future = Future()

            def run():
                started.set()
                release.wait(60)
                future.set_result(fn(*args))
            threading.Thread(target=run, daemon=True).start()
            return future

    forest.background = Held()
    forest.since_fit_ = forest.config.refit_every - 1
    row = forest.reservoir_[0] * 1.7  # the buffer changes, so a refit gives a new threshold
    forest.add(row)
    submitted = forest.reservoir_[: forest.filled_].copy()
    assert started.wait(60)
    for _ in range(3):  # traces keep being added while the fit runs, and submit no second one
        forest.add(row)
    assert forest.threshold_ == before and forest.since_fit_ == 3
    release.set()
    forest.settle()  # the next batch: waits for the fit and takes it in
    in_background = (forest.threshold_, forest.median_.copy())
    assert in_background[0] != before
    forest.background = None
    forest.reservoir_[: len(submitted)] = submitted  # the buffer as it was when the fit was submitted
    forest.filled_ = len(submitted)
    forest.fit()
    assert in_background[0] == forest.threshold_
    np.testing.assert_array_equal(in_background[1], forest.median_)


def test_scikit_learn_is_imported_at_start_only_where_fits_run_in_the_background():
    """Live, the first refit runs on the fit thread: importing scikit-learn there would
    hold the interpreter lock from decisions for its whole import, so a live pipeline
    imports it when it is built. A replay (event time) loads fitted forests and need
    not import it until it refits."""
    program = """
import sys
from traceguard.assemble import EventTimeClock, WallClock
from traceguard.config import PipelineConfig
from traceguard.pipeline import Pipeline
Pipeline(PipelineConfig(), EventTimeClock(0), [])
print("sklearn.ensemble" in sys.modules)
Pipeline(PipelineConfig(), WallClock(), [])
print("sklearn.ensemble" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
