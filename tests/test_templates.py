"""Log templates and ``log_anomaly``: masking, rarity, bursts held out, the saved state (event time, fixed seeds)."""

import numpy as np

from builders import MS, T0, row, sid, tid
from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig, TemplatesConfig
from traceguard.models import store
from traceguard.models.templates import TemplateModel, masked_head
from traceguard.pipeline import Pipeline
from traceguard.records import KIND_CLIENT, KIND_SERVER, LogRow
from traceguard.sinks import MemorySink

NEW = "redis.exceptions.ResponseError: MOVED {slot} 10.0.7.{node}:6379\nTraceback (most recent call last):\n  ..."


def test_variable_parts_are_masked_and_only_the_first_line_is_mined():
    lines = ["user 17 logged in from 10.0.0.1:5123 at 2026-12-06T10:00:01.123Z",
             "user 18 logged in from 10.0.0.2:6000 at 2026-12-06 10:00:02,5",
             "user 4711 logged in from 192.168.1.9:80 at 2026-12-07T00:00:00+01:00"]
    assert len({masked_head(line, 300) for line in lines}) == 1
    assert masked_head("order 0f8fad5b-d9cb-469f-a165-70867728950e for cafebabe12 failed", 300) == \
        "order <UUID> for <HEX> failed"
    assert masked_head("ValueError: bad\nTraceback ...\n  File x", 300) == "ValueError: bad"


def test_a_head_seen_before_mines_as_its_masked_form_and_the_memory_is_bounded():
    config = TemplatesConfig(max_templates=50)
    model, fresh = TemplateModel(config, 0.01), TemplateModel(config, 0.01)
    bodies = [f"user {i % 7} id{i % 60}x\nstack {i}" for i in range(400)] + ["user 3 id5x\nother stack"]
    for body in bodies:
        mined = model.template("api", body)
        # the same template as mining the masked head by hand, in a model that has seen the same lines
        assert mined == fresh.template("api", masked_head(body, 300)), body
    assert 0 < len(model._masked) <= config.max_templates


RETRY = "connection to db reset, retrying in {ms} ms (attempt {n})"


def _request(n: int, t_ms: float, rng, new_line: bool = False, retry: bool = False):
    """api SERVER → db CLIENT, with two ordinary lines (ids vary) and maybe the new one on the client span."""
    rows = [row(n, 1, start_ms=t_ms, end_ms=t_ms + 10, kind=KIND_SERVER, service="api", name="GET /item"),
            row(n, 2, 1, start_ms=t_ms + 1, end_ms=t_ms + 8, kind=KIND_CLIENT, service="api", name="GET item:*",
                attrs=(("db.system", "redis"),))]
    t = T0 + int(t_ms * MS)
    logs = [LogRow(tid(n), sid(1), t + 1, 0, "", f"handling GET /item/{rng.integers(10**6)}", "api"),
            LogRow(tid(n), sid(2), t + 2, 0, "", f"cache hit for item {rng.integers(10**6)} in {rng.integers(9)} ms",
                   "api")]
    if new_line:  # no severity: it must not matter
        logs.append(LogRow(tid(n), sid(2), t + 3, 0, "", NEW.format(slot=rng.integers(16384),
                                                                    node=rng.integers(2, 250)), "api"))
    if retry:  # a routine line, on the client span
        logs.append(LogRow(tid(n), sid(2), t + 4, 0, "", RETRY.format(ms=rng.integers(5, 50), n=rng.integers(1, 4)),
                           "api"))
    return rows, logs


def _run(pipeline, start: int, count: int, rng, new_line=lambda i: False, retry=lambda i: False):
    for i in range(start, start + count):
        rows, logs = _request(i + 1, i * 500.0, rng, new_line(i), retry(i))
        pipeline.accept_logs(logs)
        pipeline.accept_spans(rows)
        pipeline.advance()


def test_a_new_line_is_found_in_every_trace_of_its_burst_and_ordinary_lines_never():
    """Every trace of the burst has its finding (all emitted here: ``exemplar_findings``
    unbounded), and the burst is one incident on the stage whose span logs the line."""
    rng = np.random.default_rng(1)
    sink = MemorySink()
    config = PipelineConfig()
    config = config.model_copy(update={"incidents": config.incidents.model_copy(update={"exemplar_findings": 10**9})})
    pipeline = Pipeline(config, EventTimeClock(5 * 10**9), [sink])
    _run(pipeline, 0, 3000, rng)  # 25 minutes, 6,000 lines of two templates
    assert [a for a in sink.anomalies if a.kind.value == "log_anomaly"] == []
    # five minutes in which one request in four logs an exception the service never raised
    _run(pipeline, 3000, 600, rng, new_line=lambda i: i % 4 == 0)
    pipeline.close()
    found = [a for a in sink.anomalies if a.kind.value == "log_anomaly"]
    assert len(found) == 150 and all(a.span_id == sid(2).hex() for a in found)
    (template,) = found[0].evidence["templates"]
    assert template["service"] == "api" and template["baseline_share"] == 0
    assert template["template"].startswith("redis.exceptions.ResponseError: MOVED <NUM> <IP>")
    assert template["lines"][0]["body"].startswith("redis.exceptions.ResponseError: MOVED")
    (incident,) = {i.id: i for i in sink.incidents}.values()
    assert [(c.service, c.operation, c.signal) for c in incident.culprits] == [("api", "GET item:*", "log_template")]
    assert sum(1 for a in found if a.incident_id == incident.id) >= 147  # all but the burst's first three


def test_a_routine_line_written_far_more_often_is_one_stage_level_change_and_one_incident():
    """A retry warning in 1 request of 20 (2.4 % of the lines) is routine; written by
    every request for five minutes it is a rate jump on the stage that writes it,
    opened, then resolved once the bursts stop. No per-trace finding: the line is known."""
    rng = np.random.default_rng(3)
    sink = MemorySink()
    pipeline = Pipeline(PipelineConfig(), EventTimeClock(5 * 10**9), [sink])
    _run(pipeline, 0, 3000, rng, retry=lambda i: i % 20 == 0)  # 25 minutes
    assert [a for a in sink.anomalies if a.kind.value == "log_anomaly"] == []
    _run(pipeline, 3000, 600, rng, retry=lambda i: True)  # five minutes of retries
    _run(pipeline, 3600, 600, rng, retry=lambda i: i % 20 == 0)  # and back to normal
    pipeline.close()
    found = [a for a in sink.anomalies if a.kind.value == "log_anomaly"]
    assert {a.id for a in found} == {found[0].id} and found[0].trace_id is None
    last = found[-1]
    assert (last.service, last.operation, last.evidence["signal"]) == ("api", "GET item:*", "log_rate")
    assert [a.evidence["state"] for a in found][0] == "open" and last.evidence["state"] == "resolved"
    onset = T0 + 3000 * 500 * MS
    assert onset <= last.event_time <= onset + 10**9  # the burst's first line, not when its trace was decided
    assert last.evidence["templates"][0]["template"].startswith("connection to db reset, retrying in <NUM> ms")
    assert last.evidence["magnitude"] > 5 and last.exemplars
    (incident,) = {i.id: i for i in sink.incidents}.values()
    assert [(c.service, c.operation, c.signal) for c in incident.culprits] == [("api", "GET item:*", "log_rate")]
    assert incident.state == "resolved"


def test_an_open_rate_jump_survives_a_model_directory_and_resolves_after_it(tmp_path):
    rng = np.random.default_rng(4)
    before = MemorySink()
    first = Pipeline(PipelineConfig(), EventTimeClock(5 * 10**9), [before])
    _run(first, 0, 3000, rng, retry=lambda i: i % 20 == 0)
    _run(first, 3000, 300, rng, retry=lambda i: True)  # mid-burst: the jump is open
    first.close(decide_in_flight=False)
    store.save(first.models_for_saving(), tmp_path)
    (jump,) = first.models.templates.services_["api"].jumps.values()
    assert jump.opened_at is not None
    sink = MemorySink()
    second = Pipeline(PipelineConfig(), EventTimeClock(5 * 10**9), [sink], models=store.load(tmp_path, PipelineConfig().learned))
    _run(second, 3300, 600, rng, retry=lambda i: i % 20 == 0)
    second.close()
    (resolved,) = [a for a in sink.anomalies if a.kind.value == "log_anomaly"]
    assert resolved.evidence["state"] == "resolved" and resolved.event_time == jump.onset
    assert {a.id for a in before.anomalies if a.kind.value == "log_anomaly"} == {resolved.id}  # the same finding


def test_templates_and_their_baselines_survive_a_model_directory(tmp_path):
    rng = np.random.default_rng(2)
    pipeline = Pipeline(PipelineConfig(), EventTimeClock(5 * 10**9), [MemorySink()])
    _run(pipeline, 0, 1500, rng)
    pipeline.close()
    store.save(pipeline.models_for_saving(), tmp_path)
    loaded = store.load(tmp_path, PipelineConfig().learned)
    before, after = pipeline.models.templates, loaded.templates
    assert after.state() == before.state()
    line = "cache hit for item 99 in 3 ms"
    assert after.template("api", line) == before.template("api", line)
    assert after.share("api", after.template("api", line)[0]) > 0.4
