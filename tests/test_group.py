"""A consumer group with one judge (``consume --decided-topic``) against the real broker:
the group finds what one consumer finds, also when the judge is killed and replaced.

The latency scenario (a 3x DB slowdown, a 1.5x one, a slow leak and a burst of
cache failures) goes in as the Collector's kafka exporter writes it; the
reference is one plain consumer of the same topics.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

import orjson

from benchmarks.common import last_incidents
from benchmarks.kafka_feed import committed, feed
from benchmarks.quality import score
from benchmarks.scenario import LIVE_FAULTS, ScenarioConfig, latency_scenario, write_scenario
from benchmarks.serve_process import ServeProcess, send_balanced
from builders import T0, decide, logs_request, row
from test_consume import (FAST, consume_args, consume_in_process, findings, finish, replay_findings, start,
                          stored_findings, topics)
from test_serve import LIVE_KINDS
from traceguard.assemble import SetClock
from traceguard.config import PipelineConfig
from traceguard.group import BadRecord, decode_trace, encode_trace
from traceguard.models.series import StageSeries
from traceguard.pipeline import Pipeline
from traceguard.records import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, Anomaly, LogRow

RATE = 1.0  # traces per second of the 4 h scenario: 14,400 traces
PER_TRACE_LEARNED = ("missing_expected_span", "slow_stage", "trace_outlier", "context_outlived_parent")
STAGE_LEVEL = ("latency_regression", "error_regression")


@pytest.fixture(scope="module")
def latency(tmp_path_factory):
    directory = tmp_path_factory.mktemp("latency")
    write_scenario(directory, latency_scenario(traces_per_s=RATE), proto=True)
    return directory


def test_a_decided_trace_reaches_the_judge_as_it_was_decided():
    """What the judge rebuilds is what the member decided: spans (an unfinished one,
    an orphan, an error with its attributes, links), the indexes detectors read, logs."""
    trace = decide(row(1, 1, kind=KIND_SERVER, service="api", name="GET /", end_ms=50),
                   row(1, 2, 1, kind=KIND_CLIENT, status=STATUS_ERROR, service="api", name="SELECT",
                       attrs=(("db.system", "postgresql"), ("http.status_code", 503), ("retry", True)), links=True),
                   row(1, 3, 1, end_ms=None, service="api", name="work"),
                   row(1, 4, 99, service="cache", name="GET"))
    trace.logs = [LogRow(trace.trace_id, (2).to_bytes(8, "big"), T0, 17, "ERROR", "boom", "api"),
                  LogRow(trace.trace_id, None, T0 + 1, 9, "INFO", "done", "api")]
    judged = decode_trace(orjson.loads(encode_trace(trace)))
    fields = ("span_id", "parent_span_id", "start", "end", "kind", "status", "has_links", "service", "name",
              "attrs", "finished", "instance")
    assert ([[getattr(s, f) for f in fields] for s in judged.spans]
            == [[getattr(s, f) for f in fields] for s in trace.spans])
    assert (judged.trace_id, judged.reason, judged.decided_at, judged.first_seen) == (
        trace.trace_id, trace.reason, trace.decided_at, trace.first_seen)
    assert judged.root.span_id == trace.root.span_id and [s.span_id for s in judged.orphans] == [(4).to_bytes(8, "big")]
    assert judged.derived["stages"] == trace.derived["stages"]
    assert [s.span_id for s in judged.derived["failed"]] == [(2).to_bytes(8, "big")]
    assert [(r.span_id, r.time, r.severity_number, r.body) for r in judged.logs] == [
        (r.span_id, r.time, r.severity_number, r.body) for r in trace.logs]
    document = orjson.loads(encode_trace(trace))
    document["spans"][0][0] = "00"
    with pytest.raises(BadRecord):
        decode_trace(document)


def test_a_judges_traces_fill_the_stage_series_its_member_shows():
    """The judge's pipeline is made anew at each takeover; the member's API holds one
    series, which the judging pipeline fills."""
    series = StageSeries(10, 10)
    clock = SetClock(deterministic=True)
    pipeline = Pipeline(PipelineConfig(), clock, [], judging=True, series=series)
    for i in range(200):  # 20 calls a minute for 10 minutes
        trace = decide(row(i + 1, 1, kind=KIND_SERVER, service="api", name="GET /", start_ms=i * 3000,
                           end_ms=i * 3000 + 20))
        clock.set(trace.decided_at)
        pipeline.judge(decode_trace(orjson.loads(encode_trace(trace))))
        pipeline.advance_detectors()
    (stage,) = series.of("api", "GET /")
    assert len(stage["latency"]) >= 8 and stage["errors"]


def test_a_trace_judged_at_an_unchanged_clock_reaches_the_windowed_detectors():
    """advance_detectors skips a call that would find nothing new (the clock where it
    was, nothing given since); a trace judged in between is something new: with a
    forest batch of one, the next call at the same time scores it."""
    clock = SetClock(deterministic=True)
    pipeline = Pipeline(PipelineConfig(learned={"forest": {"batch": 1}}), clock, [], judging=True)
    trace = decide(row(1, 1, kind=KIND_SERVER, service="api", name="GET /", end_ms=20))
    clock.set(trace.decided_at)
    pipeline.advance_detectors()
    pipeline.judge(trace)
    assert pipeline.batched() == 1
    pipeline.advance_detectors()
    assert pipeline.batched() == 0


def outcome(outs: list[Path], states: list[Path]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every finding (last version by id) and every incident (last version by id) of these members."""
    findings: dict[str, dict] = {}
    for out in outs:
        for line in out.read_text().splitlines():
            finding = json.loads(line)
            findings[finding["id"]] = finding
    return findings, last_incidents(states)


@pytest.fixture(scope="module")
def one_consumer(kafka_bootstrap, latency, tmp_path_factory):
    work = tmp_path_factory.mktemp("one")
    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, latency, traces, logs)
    finish(start(consume_args(kafka_bootstrap, traces, logs, work / "out.jsonl", "--state-dir", str(work / "state"))))
    return outcome([work / "out.jsonl"], [work / "state"])


def culprits(incidents: dict[str, dict]) -> dict[str, tuple]:
    return {i: (v["service"], v["operation"], v["onset"], [(c["service"], c["operation"]) for c in v["culprits"]])
            for i, v in incidents.items()}


def assert_same_as_one(group: tuple[dict, dict], one: tuple[dict, dict]) -> None:
    (found, incidents), (expected, expected_incidents) = group, one
    assert expected_incidents, "the scenario's faults open incidents"
    assert culprits(incidents) == culprits(expected_incidents)
    stage = {k for k, v in expected.items() if v["kind"] in STAGE_LEVEL}
    assert stage and stage == {k for k, v in found.items() if v["kind"] in STAGE_LEVEL}
    per_trace = Counter(v["kind"] for v in found.values() if v["trace_id"] and v["kind"] in PER_TRACE_LEARNED)
    reference = Counter(v["kind"] for v in expected.values() if v["trace_id"] and v["kind"] in PER_TRACE_LEARNED)
    for kind, count in reference.items():
        assert abs(per_trace[kind] - count) <= 0.02 * count, (kind, per_trace[kind], count)
    learned = set(PER_TRACE_LEARNED) | set(STAGE_LEVEL) | {"log_anomaly"}
    # what needs no learned state is the same finding for finding
    a = {k for k, v in found.items() if v["kind"] not in learned}
    b = {k for k, v in expected.items() if v["kind"] not in learned}
    assert a == b, ([(found[k]["kind"], found[k]["trace_id"], found[k]["summary"]) for k in a - b],
                    [(expected[k]["kind"], expected[k]["trace_id"], expected[k]["summary"]) for k in b - a])


def judged_args(bootstrap: str, traces: str, logs: str, work: Path, name: str) -> list[str]:
    return consume_args(bootstrap, traces, logs, work / f"{name}.jsonl", "--state-dir", str(work / name),
                        "--decided-topic", f"decided_{traces}")


def test_a_group_with_one_judge_finds_what_one_consumer_finds(kafka_bootstrap, latency, one_consumer, tmp_path):
    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, latency, traces, logs)
    members = [start(judged_args(kafka_bootstrap, traces, logs, tmp_path, name)) for name in ("a", "b", "c")]
    stderr = [finish(member) for member in members]
    judging = [line for text in stderr for line in text.splitlines() if "judging the group" in line]
    assert sum("from the start" in line for line in judging) == 1, judging  # one judge from the start
    # (a member still waiting when the judge is done and leaves may take over to find nothing left)
    assert all("from the last judge's state" in line for line in judging if "from the start" not in line), judging
    names = ("a", "b", "c")
    assert_same_as_one(outcome([tmp_path / f"{n}.jsonl" for n in names], [tmp_path / n for n in names]), one_consumer)


def test_the_judge_killed_mid_stream_and_replaced(kafka_bootstrap, latency, one_consumer, tmp_path, monkeypatch):
    monkeypatch.setitem(FAST, "TRACEGUARD_CONSUME__SNAPSHOT_INTERVAL", "1s")
    traces, logs = topics(kafka_bootstrap)
    sent = feed(kafka_bootstrap, latency, traces, logs)
    judge = start(judged_args(kafka_bootstrap, traces, logs, tmp_path, "a"))  # alone, so the judge
    deadline = time.monotonic() + 300
    while committed(kafka_bootstrap, f"g_{traces}.judge") == 0:  # its first snapshot
        assert judge.poll() is None, "the judge ended before a second member joined"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    other = start(judged_args(kafka_bootstrap, traces, logs, tmp_path, "b"))
    while committed(kafka_bootstrap, f"g_{traces}") < sent[traces] // 3:
        assert judge.poll() is None, "the judge ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    judge.send_signal(signal.SIGKILL)
    judge.wait()
    assert committed(kafka_bootstrap, f"g_{traces}") < sent[traces] + sent[logs], "killed mid-stream"
    replacement = start(judged_args(kafka_bootstrap, traces, logs, tmp_path, "c"))
    stderr = finish(other) + finish(replacement)
    assert "judging the group from the last judge's state" in stderr
    names = ("a", "b", "c")
    assert_same_as_one(outcome([tmp_path / f"{n}.jsonl" for n in names],
                               [tmp_path / n for n in names if (tmp_path / n / "anomalies.sqlite").exists()]),
                       one_consumer)


def test_a_judge_saves_no_state_past_findings_its_store_cannot_write(kafka_bootstrap, scenario_proto, tmp_path):
    """A full disk under the judge's ``--state-dir``: the store holds the findings back,
    so no snapshot is taken past them (the next judge would start after them) and
    consume ends with an error; run again with room, the judge judges their traces
    again and the store has them all.

    Judged again, a held trace may be found otherwise: restored from its snapshot,
    the judge takes the traces after it in another order and at other clock times
    than the first run did (records its members wrote around the snapshot's offset),
    and a kind whose verdict counts what came before may then call the trace's
    stage routine (one stage-level finding naming it) instead of reporting the
    trace alone. Seen once with context_outlived_parent."""
    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, scenario_proto, traces, logs)
    # the judge tries to snapshot all along; the member commits only at its end
    judged = {"consume.decided_topic": f"decided_{traces}", "consume.snapshot_interval": "10ms",
              "consume.commit_interval": "1h"}
    status, first = consume_in_process(kafka_bootstrap, traces, logs, tmp_path, "first", full=True, **judged)
    assert status == 1
    assert first.pipeline.metrics.get("traceguard_store_backlog") > 0
    held = findings(tmp_path / "first.jsonl")
    assert held
    status, _ = consume_in_process(kafka_bootstrap, traces, logs, tmp_path, "second", full=False, **judged)
    assert status == 0
    stored = stored_findings(tmp_path)
    named = {(a.kind.value, trace) for a in stored.values() for trace in (a.trace_id, *a.exemplars) if trace}
    for finding_id, finding in held.items():
        assert finding_id in stored or (finding["kind"], finding["trace_id"]) in named, finding
    assert set(findings(tmp_path / "second.jsonl")) <= stored.keys()


INTRINSIC = ("missing_parent", "missing_root", "unfinished_span")  # a whole trace's own content decides them


def test_a_live_group_with_one_judge(kafka_bootstrap, scenario_proto, tmp_path):
    """Wall time, as the manifest runs it: two members and their judge find in the structural
    scenario what replay finds of the kinds a whole trace's content decides, and nothing twice."""
    expected = replay_findings(scenario_proto, tmp_path / "replay.jsonl")
    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, scenario_proto, traces, logs)
    live = ("--time", "wall", "--decision-wait", "2s")
    members = [start(judged_args(kafka_bootstrap, traces, logs, tmp_path, name) + list(live)) for name in ("a", "b")]
    stderr = [finish(member) for member in members]
    assert sum("judging the group from the start" in text for text in stderr) == 1
    lines = [json.loads(line) for name in ("a", "b") for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    found = {f["id"] for f in lines if f["kind"] in INTRINSIC}
    assert len(found) == sum(f["kind"] in INTRINSIC for f in lines)  # each once
    assert found == {k for k, v in expected.items() if v["kind"] in INTRINSIC} and len(found) > 20
    # a rebalance re-reads log records past the last commit: still each record once
    linked = [f for f in lines if f["kind"] in INTRINSIC and f["logs"]]
    assert linked
    for finding in linked:
        records = [json.dumps(record, sort_keys=True) for record in finding["logs"]]
        assert len(set(records)) == len(records), finding["id"]


def _serve_group(bootstrap: str, topic: str, work: Path, name: str) -> ServeProcess:
    # a generous decision wait: on a busy machine two exports of one trace can be seconds apart
    return ServeProcess(work / name, "--decision-wait", "10s", "--max-trace-age", "20s", "--decided-topic", topic,
                        "--bootstrap-servers", bootstrap, "--group", f"g_{topic}",
                        env={"TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": "1000000000"})


def _send_balanced(servers: list[ServeProcess], seed: int) -> list[dict]:
    return send_balanced(servers, ScenarioConfig(traces=1500, seed=seed, duration_s=900, fault_rate=0.2,
                                                 cooldown_s=30, faults=LIVE_FAULTS))


def _found_all(judge: ServeProcess, labels: list[dict]):
    expected = sum(1 for label in labels if label["kind"] in LIVE_KINDS)

    def settled():
        table = score([Anomaly.model_validate(a) for a in judge.anomalies()], labels, LIVE_KINDS)
        return table if sum(row["true_positives"] for row in table.values()) >= expected else None

    return judge.wait_for(settled, timeout=300, what="every labelled finding from the judge")


def test_load_balanced_serve_instances_with_one_judge(kafka_bootstrap, tmp_path):
    """``serve`` instances behind the load-balancing exporter, with a broker: one judge
    detects on all traces, each finding is stored once, by the judge; when the judge
    stops the other instance takes over from its state and the traffic it now gets
    all is judged as well."""
    topic = f"decided_serve_{time.time_ns()}"
    servers = [_serve_group(kafka_bootstrap, topic, tmp_path, name) for name in ("a", "b")]
    labels = _send_balanced(servers, seed=5)
    which = servers[0].wait_for(lambda: [s for s in servers if s.metric("traceguard_group_judging") == 1],
                                timeout=120, what="a judge")
    assert len(which) == 1
    judge, other = which[0], next(s for s in servers if s is not which[0])
    table = _found_all(judge, labels)
    for kind in LIVE_KINDS:
        assert table[kind]["labels"] >= 3, (kind, table[kind])
        assert table[kind]["precision"] >= 0.99 and table[kind]["recall"] >= 0.99, (kind, table[kind])
    assert other.anomalies() == []  # the member only assembles

    def all_judged():
        forwarded = [s.metric("traceguard_group_traces_forwarded_total") for s in servers]
        return forwarded if judge.metric("traceguard_group_traces_judged_total") == sum(forwarded) else None

    assert min(judge.wait_for(all_judged, timeout=120, what="every decided trace judged")) > 500
    first = {a["id"] for a in judge.anomalies() if a["trace_id"]}

    # a log that comes after its trace was decided, to the member that decided it: the judge links it
    at = servers.index(other)
    finding = next(a for a in judge.anomalies(kind="missing_root") if int(a["trace_id"], 16) % 2 == at)
    late_log = logs_request(dict(trace_id=bytes.fromhex(finding["trace_id"]), time_unix_nano=3,
                                 severity_number=17, severity_text="ERROR", body="late: pool exhausted"))
    assert httpx.post(f"http://127.0.0.1:{other.http}/v1/logs", content=late_log.SerializeToString(),
                      headers={"content-type": "application/x-protobuf"}).status_code == 200
    judge.wait_for(lambda: "late: pool exhausted" in [
        log["body"] for log in judge.client.get(f"/api/anomalies/{finding['id']}").json()["logs"]],
        what="the late log linked by the judge")

    assert judge.stop() == 0  # SIGTERM: it saves its state and leaves; the load balancer sends all to the other
    second = _send_balanced([other], seed=6)
    other.wait_for(lambda: other.metric("traceguard_group_judging") == 1, timeout=120, what="the takeover")
    table = _found_all(other, second)
    for kind in LIVE_KINDS:
        assert table[kind]["precision"] >= 0.99 and table[kind]["recall"] >= 0.99, (kind, table[kind])
    assert not first & {a["id"] for a in other.anomalies() if a["trace_id"]}  # no trace judged twice
    assert other.stop() == 0
    log = "".join(judge.lines + other.lines)
    assert log.count("judging the group from the start") == 1
    assert log.count("judging the group from the last judge's state") == 1
