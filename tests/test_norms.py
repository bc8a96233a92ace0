"""What a stage does routinely is its norm; a change of it is a finding (event time, fixed seeds)."""

import numpy as np

from builders import T0, row, sid, tid
from test_learned import MINUTE_MS, of_kind, stream
from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig
from traceguard.models.rates import RateModel
from traceguard.pipeline import Pipeline
from traceguard.records import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, LogRow
from traceguard.sinks import MemorySink

SECOND_NS = 10**9


def _rates(direction="up", **overrides):
    settings = dict(window=30 * SECOND_NS, persist_windows=2, half_life=0, z=5.0, min_ratio=2.0, min_calls=200,
                    min_window_calls=20, max_keys=100)
    return RateModel(direction, **{**settings, **overrides})


def _feed(model, seconds, rate, *, start_s=0, per_s=10, seed=1):
    """``per_s`` calls a second for ``seconds``, a share ``rate`` of them hits; returns the changes."""
    rng = np.random.default_rng(seed)
    events = []
    for s in range(start_s, start_s + seconds):
        now = T0 + s * SECOND_NS
        hits = int(rng.binomial(per_s, rate))
        model.observe("stage", per_s, hits, now, now if hits else 0, f"{s:032x}", events)
    return events


def test_a_routine_rate_is_the_norm_and_a_rise_opens_and_resolves():
    model = _rates()
    assert _feed(model, 600, 0.05) == []  # 5 % of calls, ten minutes: the norm
    calls, rate = model.rate("stage")
    assert 0.04 < rate < 0.06 and calls > 5000
    opened = _feed(model, 120, 0.30, start_s=600, seed=2)
    assert [e.resolved_at for e in opened] == [None]
    (change,) = opened
    assert T0 + 600 * SECOND_NS <= change.onset <= T0 + 630 * SECOND_NS
    assert change.current_rate > 0.2 and change.magnitude > 4
    assert 0.04 < model.rate("stage")[1] < 0.06  # the rise is not absorbed
    resolved = _feed(model, 120, 0.05, start_s=720, seed=3)
    assert [e.resolved_at is not None for e in resolved] == [True] and resolved[0] is change


def test_a_dropped_call_opens_a_change_watching_down():
    model = _rates("down")
    assert _feed(model, 300, 0.97) == []
    (change,) = _feed(model, 90, 0.2, start_s=300, seed=4)
    assert change.baseline_rate > 0.9 and change.current_rate < 0.3


def _outliving(n, t_ms, rng, *, outlive: bool, name="GET /x"):
    """api SERVER with an INTERNAL child that ends 5 ms after it when ``outlive``."""
    end = t_ms + 10
    return [row(n, 1, start_ms=t_ms, end_ms=end, kind=KIND_SERVER, service="api", name=name),
            row(n, 2, 1, start_ms=t_ms + 1, end_ms=end + (5 if outlive else -1), kind=KIND_INTERNAL,
                service="api", name="refresh")]


def _run_outliving(minutes, share, *, leak_from_min=None, leak_share=0.0, seed=1, names=("GET /x",),
                   with_pipeline=False):
    rng = np.random.default_rng(seed)
    sink = MemorySink()
    pipeline = Pipeline(PipelineConfig(), EventTimeClock(5 * SECOND_NS), [sink])
    for i in range(int(minutes * 60 * 2)):
        t_ms = i * 500
        p = leak_share if leak_from_min is not None and t_ms >= leak_from_min * MINUTE_MS else share
        pipeline.accept_spans(_outliving(i + 1, t_ms, rng, outlive=rng.random() < p, name=names[i % len(names)]))
        pipeline.advance()
    pipeline.close()
    return (sink, pipeline) if with_pipeline else sink


def test_a_service_whose_stages_are_routine_gets_one_pattern_finding():
    """Two handlers of one service whose callbacks finish after the response: one
    finding for the service's routine, no occurrence, and both stages learned."""
    sink, pipeline = _run_outliving(30, 0.12, names=("GET /x", "GET /y"), with_pipeline=True)
    (norm,) = of_kind(sink, "context_outlived_parent")
    assert norm.trace_id is None and norm.evidence["state"] == "norm" and norm.service == "api"
    assert [s["operation"] for s in norm.evidence["stages"]] in (["GET /x"], ["GET /y"], ["GET /x", "GET /y"])
    assert pipeline.metrics.gauges()["traceguard_context_outlived_parent_routine_stages"] == 2


def test_a_stage_that_routinely_outlives_its_parent_is_reported_once_as_its_norm():
    sink = _run_outliving(30, 0.12)  # 3,600 calls, 12 % of them outlived: Node.js-style callbacks
    found = of_kind(sink, "context_outlived_parent")
    assert [(a.trace_id, a.evidence["state"]) for a in found] == [(None, "norm")]
    assert found[0].evidence["calls"] >= 50 and 0.03 < found[0].evidence["rate"] < 0.3  # an early estimate
    assert found[0].severity == "info"
    assert sink.incidents == []


def test_a_leak_on_a_clean_stage_is_found_per_trace_and_becomes_an_incident():
    sink = _run_outliving(30, 0.0, leak_from_min=15, leak_share=0.3)
    found = of_kind(sink, "context_outlived_parent")
    per_trace = [a for a in found if a.trace_id]
    stage_level = [a for a in found if a.trace_id is None]
    assert per_trace and all(a.event_time >= T0 + 15 * MINUTE_MS * 10**6 for a in per_trace)
    assert [a.evidence["signal"] for a in stage_level if a.evidence["state"] == "open"] == ["outlived_parent"]
    assert len({i.id for i in sink.incidents}) == 1


def test_a_rise_of_a_routine_rate_is_an_incident():
    sink = _run_outliving(30, 0.05, leak_from_min=15, leak_share=0.5)
    found = of_kind(sink, "context_outlived_parent")
    assert [a.evidence["state"] for a in found if a.trace_id is None][:2] == ["norm", "open"]
    (incident,) = {i.id: i for i in sink.incidents}.values()
    assert incident.culprits[0].operation == "GET /x" and incident.culprits[0].signal == "outlived_parent"


def test_a_stage_absent_in_five_percent_of_requests_is_learned_as_optional():
    """The feedback loop of learning only from unflagged traces: render is skipped by
    5 % of requests (the failed ones). Learning only from unflagged traces kept its
    presence at 1.0 and fired on every one of them, for ever (~180 here)."""
    skip = np.random.default_rng(8)
    pipeline, sink = stream(60, render=lambda m: skip.random() >= 0.05, seed=3)
    pipeline.close()
    found = of_kind(sink, "missing_expected_span")
    assert len(found) <= 5, [a.summary for a in found]
    presence = pipeline.models.structure.roots_[("api", "GET /item")].stages[("api", "render", KIND_INTERNAL)]
    assert 0.93 < presence / pipeline.models.structure.roots_[("api", "GET /item")].traces < 0.97


def test_clock_skew_on_client_spans_opens_no_regression():
    """A CLIENT span's own time is network plus skew; the server side carries the stage's latency."""
    rng = np.random.default_rng(2)
    sink = MemorySink()
    pipeline = Pipeline(PipelineConfig(), EventTimeClock(5 * SECOND_NS), [sink])
    for i in range(7200):
        t_ms = i * 500
        skew = 4.0 if (t_ms // (10 * MINUTE_MS)) % 2 else -4.0  # the server's clock jumps every 10 minutes
        server_ms = 3 * float(np.exp(rng.normal(0, 0.3)))
        pipeline.accept_spans([
            row(i + 1, 1, start_ms=t_ms, end_ms=t_ms + server_ms + 4, kind=KIND_SERVER, service="web", name="GET /"),
            row(i + 1, 2, 1, start_ms=t_ms + 1, end_ms=t_ms + server_ms + 3, kind=KIND_CLIENT, service="web",
                name="db-api.Get"),
            row(i + 1, 3, 2, start_ms=t_ms + 2 + skew, end_ms=t_ms + 2 + skew + server_ms, kind=KIND_SERVER,
                service="db-api", name="Get"),
        ])
        pipeline.advance()
    pipeline.close()
    assert of_kind(sink, "latency_regression") == [] and sink.incidents == []


def test_a_fast_trace_is_never_an_outlier_and_a_slow_warm_up_is_outgrown():
    # warm-up taken during a slow spell (3x), then normal speed for an hour
    pipeline, sink = stream(15, speed=lambda m: 3.0)
    stream(60, pipeline=pipeline, start_ms=15 * MINUTE_MS, first_n=10**6, speed=lambda m: 1.0)
    pipeline.close()
    assert of_kind(sink, "trace_outlier") == [] and of_kind(sink, "slow_stage") == []


def test_an_occurrence_on_a_quiet_stage_is_not_held_for_ever():
    """A stage with too few calls for a norm: its leak is reported once it has
    waited ten windows, while the input goes on (a live sidecar never ends it)."""
    rng = np.random.default_rng(3)
    sink = MemorySink()
    pipeline = Pipeline(PipelineConfig(), EventTimeClock(5 * SECOND_NS), [sink])
    for i in range(150):  # one call every 5 s for 12.5 minutes: 150 calls, under norm_min_calls
        pipeline.accept_spans(_outliving(i + 1, i * 5000, rng, outlive=i == 10))
        pipeline.advance()
        if i * 5000 < 5 * MINUTE_MS:
            assert of_kind(sink, "context_outlived_parent") == []  # held: the norm is not known yet
    (leak,) = of_kind(sink, "context_outlived_parent")
    assert leak.trace_id == f"{11:032x}"


def _failing(n, t_ms, *, fails: bool, failed_status: int = 2):
    """web SERVER → web CLIENT → orders SERVER → orders CLIENT (the database); a
    failing database call fails every span above it, as a propagated error does
    (with ``failed_status``: 0 is what an instrumentation that records the
    exception but sets no status leaves)."""
    status = failed_status if fails else 0
    return [row(n, 1, start_ms=t_ms, end_ms=t_ms + 20, kind=KIND_SERVER, service="web", name="GET /", status=status),
            row(n, 2, 1, start_ms=t_ms + 1, end_ms=t_ms + 19, kind=KIND_CLIENT, service="web", name="POST /order",
                status=status),
            row(n, 3, 2, start_ms=t_ms + 2, end_ms=t_ms + 18, kind=KIND_SERVER, service="orders",
                name="POST /order", status=status),
            row(n, 4, 3, start_ms=t_ms + 3, end_ms=t_ms + 10, kind=KIND_CLIENT, service="orders",
                name="INSERT orders", status=status)]


def _run_failing(minutes, share, *, fault_from_min=None, fault_until_min=None, fault_share=0.0, seed=1,
                 failed_status=2):
    rng = np.random.default_rng(seed)
    sink = MemorySink()
    pipeline = Pipeline(PipelineConfig(), EventTimeClock(5 * SECOND_NS), [sink])
    for i in range(int(minutes * 60 * 4)):
        t_ms = i * 250
        faulty = fault_from_min is not None and fault_from_min * MINUTE_MS <= t_ms < fault_until_min * MINUTE_MS
        fails = rng.random() < (fault_share if faulty else share)
        if fails:  # the database call's exception event: a timeout as usual, a new error during the fault
            what = "redis.exceptions.ResponseError: MOVED 3999" if faulty else "TimeoutError: timed out"
            pipeline.accept_logs([LogRow(tid(i + 1), sid(4), T0 + int((t_ms + 10) * 1e6), 17, "ERROR", what, "orders")])
        pipeline.accept_spans(_failing(i + 1, t_ms, fails=fails, failed_status=failed_status))
        pipeline.advance()
    pipeline.close()
    return sink


def test_errors_at_their_normal_rate_are_no_finding():
    """A stage that fails 5 % of the time by design, for an hour: nothing."""
    sink = _run_failing(60, 0.05)
    assert of_kind(sink, "error_regression") == [] and sink.incidents == []


def test_a_rise_of_errors_is_one_incident_on_the_deepest_failing_stage():
    """The database call starts failing 40 % of the time for five minutes; every
    caller fails with it. One change, on the database call (its callers' own
    failures did not rise: theirs come from below), one incident, resolved."""
    sink = _run_failing(30, 0.05, fault_from_min=15, fault_until_min=20, fault_share=0.4)
    found = of_kind(sink, "error_regression")
    assert {(a.service, a.operation) for a in found} == {("orders", "INSERT orders")}
    assert [a.evidence["state"] for a in found] == ["open", "resolved"]
    opened = found[0]
    assert 15 * MINUTE_MS <= (opened.event_time - T0) / 1e6 <= 16 * MINUTE_MS  # onset: the first failure after
    assert opened.detected_at - opened.event_time <= 2 * 60 * SECOND_NS  # within two minutes
    assert opened.evidence["baseline_rate"] < 0.08 and opened.evidence["current_rate"] > 0.25
    assert opened.exemplars and opened.evidence["signal"] == "errors"
    # what rose: the new exception type, never seen in the usual failures; timeouts go on as usual
    reasons = {r["reason"]: r for r in opened.evidence["reasons"]}
    assert opened.evidence["reasons"][0]["reason"] == "redis.exceptions.ResponseError"
    assert reasons["redis.exceptions.ResponseError"]["usual"] == 0 and reasons["redis.exceptions.ResponseError"]["recent"] > 20
    assert reasons["TimeoutError"]["usual"] > 100
    incidents = {i.id: i for i in sink.incidents}
    assert len(incidents) == 1
    (incident,) = incidents.values()
    assert incident.culprits[0].service == "orders" and incident.state == "resolved"


def test_an_exception_event_on_a_span_with_no_status_is_a_failure():
    """The same rise where no span's status was set, only the database call's
    exception event recorded (Go's RecordError): found on the database call."""
    sink = _run_failing(30, 0.05, fault_from_min=15, fault_until_min=20, fault_share=0.4, failed_status=0)
    assert {(a.service, a.operation) for a in of_kind(sink, "error_regression")} == {("orders", "INSERT orders")}


def test_an_exception_event_on_a_span_with_status_ok_is_no_failure():
    """An instrumentation that sets OK after recording the exception judged it handled."""
    sink = _run_failing(30, 0.05, fault_from_min=15, fault_until_min=20, fault_share=0.4, failed_status=1)
    assert of_kind(sink, "error_regression") == []
