"""``traceguard consume`` against the real Kafka broker that scripts/test starts.

Scenario traffic is produced the way the Collector's kafka exporter writes it
(one message per trace id, keyed by its hex id, four partitions per topic) and
the findings are compared with ``traceguard replay`` of the same files. Event
time throughout, so every run is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from benchmarks.kafka_feed import committed, create_topics, feed
from benchmarks.scenario import ScenarioConfig, write_scenario
from traceguard.records import Anomaly

PARTITIONS = 4
# Frequent commits, so a kill lands between them; fast rebalances.
FAST = {"TRACEGUARD_CONSUME__COMMIT_INTERVAL": "100ms", "TRACEGUARD_CONSUME__HEARTBEAT_INTERVAL": "300ms",
        "TRACEGUARD_CONSUME__SESSION_TIMEOUT": "6s", **(EVERY := {"TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": "1000000000"})}
# EVERY: replay and consume emit every per-trace finding, also those an incident
# explains, so what is compared is detection, not how many an incident pages.


def topics(bootstrap: str) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    traces, logs = f"spans_{suffix}", f"logs_{suffix}"
    create_topics(bootstrap, {traces: PARTITIONS, logs: PARTITIONS})
    return traces, logs


def consume_args(bootstrap: str, traces: str, logs: str, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "traceguard", "consume", "--bootstrap-servers", bootstrap,
            "--group", f"g_{traces}", "--traces-topic", traces, "--logs-topic", logs, "--time", "event",
            "--initial-offset", "earliest", "--exit-at-end", "--anomalies-topic", "", "--out", str(out), *extra]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **FAST})


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Waits generously (a busy CI machine is slow); a process still running then
    is stuck: SIGABRT makes it print its threads' stacks and end (see cli.main)."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s; its stderr and stacks:\n{stderr[-12000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stderr


# What was found, as opposed to when it was decided: the event-time watermark
# moves in steps of one message, and the exporter's one-message-per-trace
# split makes those steps finer than replay's whole export requests, so
# ``detected_at`` (and the decision times quoted in evidence) differ slightly.
FOUND = ("id", "kind", "trace_id", "span_id", "service", "operation", "event_time", "severity", "exemplars", "incident_id",
         "logs")


def findings(path: Path) -> dict[str, dict]:
    """What was found, by finding id; a finding written twice (re-read after a crash) must say the same,
    except for the incident it was grouped into (incidents are not checkpointed): the last one counts."""
    by_id: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        finding = json.loads(line)
        found = {key: finding[key] for key in FOUND}
        first = by_id.setdefault(finding["id"], found)
        assert {**first, "incident_id": None} == {**found, "incident_id": None}
        first["incident_id"] = found["incident_id"]
    return by_id


# context_outlived_parent: whether a stage's outliving is routine is its learned norm.
LEARNED = {"missing_expected_span", "slow_stage", "latency_regression", "trace_outlier", "context_outlived_parent"}


def per_trace(by_id: dict[str, dict]) -> dict[str, dict]:
    """The per-trace findings whose detection needs no learned state, without the
    incident they were grouped into (incidents come from learned state too)."""
    return {k: {**v, "incident_id": None} for k, v in by_id.items()
            if v["kind"] not in LEARNED and v["trace_id"] is not None}


def replay_findings(scenario: Path, out: Path) -> dict[str, dict]:
    subprocess.run([sys.executable, "-m", "traceguard", "replay", scenario / "traces.pb", "--logs",
                    scenario / "logs.pb", "--out", out], check=True, capture_output=True, timeout=300,
                   env={**os.environ, **EVERY})
    return findings(out)



@pytest.fixture(scope="module")
def replayed(scenario_proto, tmp_path_factory):
    return replay_findings(scenario_proto, tmp_path_factory.mktemp("replay") / "findings.jsonl")


@pytest.mark.parametrize("encoding,compression", [("otlp_proto", None), ("otlp_json", None), ("otlp_proto", "zstd")])
def test_consume_finds_what_replay_finds(kafka_bootstrap, scenario_proto, replayed, tmp_path, encoding, compression):
    traces, logs = topics(kafka_bootstrap)
    sent = feed(kafka_bootstrap, scenario_proto, traces, logs, encoding, compression=compression)
    out = tmp_path / "findings.jsonl"
    anomalies_topic = f"anomalies_{traces}"
    stderr = finish(start(consume_args(kafka_bootstrap, traces, logs, out, "--encoding", encoding,
                                       "--anomalies-topic", anomalies_topic)))
    assert f"{sent[traces] + sent[logs]} records" in stderr
    got = findings(out)
    assert got == replayed  # same ids, same spans and stages, same linked logs
    assert len({f["kind"] for f in got.values()}) >= 6
    assert any(log["body"].startswith("ConnectionRefusedError") for f in got.values() for log in f["logs"]), \
        "span events (exception events here) came through Kafka as their findings' logs"

    reader = KafkaConsumer(anomalies_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=3000)
    published, incidents = {}, {}
    for message in reader:
        record = dict(message.headers)[b"traceguard.record".decode()] if message.headers else None
        value = json.loads(message.value)
        if record == b"incident":  # incident state changes share the topic, keyed incident/<id>
            assert message.key.decode() == f"incident/{value['id']}"
            incidents[value["id"]] = value
            continue
        assert record == b"finding"
        assert message.key.decode() == (value["trace_id"] or f"{value['service']}/{value['operation']}")
        published[value["id"]] = {key: value[key] for key in FOUND}
    reader.close()
    assert published == replayed
    pointed = {f["incident_id"] for f in replayed.values()} - {None}
    assert set(incidents) == pointed


def test_kill_9_mid_stream_then_restart_loses_nothing(kafka_bootstrap, scenario_proto, replayed, tmp_path):
    traces, logs = topics(kafka_bootstrap)
    sent = feed(kafka_bootstrap, scenario_proto, traces, logs)
    total = sent[traces] + sent[logs]
    out = tmp_path / "findings.jsonl"
    args = consume_args(kafka_bootstrap, traces, logs, out, "--state-dir", str(tmp_path / "state"))
    first = start(args)
    deadline = time.monotonic() + 120
    while (done := committed(kafka_bootstrap, f"g_{traces}")) < total // 4:
        assert first.poll() is None, "the consumer ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    at_kill = committed(kafka_bootstrap, f"g_{traces}")
    assert done <= at_kill < total, "killed in the middle of the stream"
    finish(start(args))
    after = findings(out)
    # Nothing is lost: every finding that needs no learned state is there. Traces
    # decided after the last checkpoint are decided (and learned from) again after
    # the restart, and open incidents are not checkpointed, so learned findings and
    # incident ids may differ a little.
    assert per_trace(after) == per_trace(replayed)
    learned = {k for k in replayed if k not in per_trace(replayed)}
    # (what differs is a few missing_expected_span findings near their presence bar: the
    # traces read again after the restart are learned twice; 2-3 of 56 in repeated runs)
    differ = learned ^ {k for k in after if k not in per_trace(after)}
    assert len(differ) <= max(3, 0.1 * len(learned)), sorted(differ)


def test_two_consumers_split_the_partitions_and_find_what_one_finds(kafka_bootstrap, tmp_path):
    scenario = tmp_path / "scenario"
    write_scenario(scenario, ScenarioConfig(traces=5000, seed=11, duration_s=2400, fault_rate=0.1), proto=True)
    expected = replay_findings(scenario, tmp_path / "replay.jsonl")
    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, scenario, traces, logs)
    first = start(consume_args(kafka_bootstrap, traces, logs, tmp_path / "first.jsonl"))
    deadline = time.monotonic() + 120
    while committed(kafka_bootstrap, f"g_{traces}") == 0:  # the first is mid-stream when the second joins
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    second = start(consume_args(kafka_bootstrap, traces, logs, tmp_path / "second.jsonl"))
    logs_first, logs_second = finish(first), finish(second)
    assert "partitions revoked" in logs_first  # the group rebalanced under the first
    for stderr in (logs_first, logs_second):
        read = int(stderr.split("traceguard consume: ")[1].split(" records")[0])
        assert read > 0
    union = {**findings(tmp_path / "first.jsonl"), **findings(tmp_path / "second.jsonl")}
    # Learned state is per member: each learns the structure from its own half of
    # the traces, so learned kinds are not compared (the note gives the figures).
    assert per_trace(union) == per_trace(expected)


def test_poison_records_are_skipped_counted_and_dead_lettered(kafka_bootstrap, scenario_proto, replayed, tmp_path):
    traces, logs = topics(kafka_bootstrap)
    poison = [(traces, b"00000000000000000000000000000001", b"\x0a\xff\xff\xff\xff\x0f"),  # length past the end
              (traces, None, b"definitely { not protobuf"),
              (logs, None, b"\xff" * 64)]
    feed(kafka_bootstrap, scenario_proto, traces, logs, extra=poison)
    dead = f"dead_{traces}"
    out = tmp_path / "findings.jsonl"
    stderr = finish(start(consume_args(kafka_bootstrap, traces, logs, out, "--dead-letter-topic", dead)))
    assert findings(out) == replayed
    assert "poison record skipped" in stderr and f"{traces}/" in stderr
    assert f"2 Kafka record(s) could not be decoded and were skipped (topic={traces}) " \
           f"(traceguard_kafka_poison_records_total{{topic={traces}}})" in stderr
    assert f"1 Kafka record(s) could not be decoded and were skipped (topic={logs})" in stderr
    reader = KafkaConsumer(dead, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=3000)
    letters = [(dict(m.headers)["traceguard.topic"].decode(), m.value) for m in reader]
    reader.close()
    assert sorted(letters) == sorted((topic, value) for topic, _, value in poison)


def test_wall_time_at_the_bound_pauses_instead_of_evicting(kafka_bootstrap, scenario_proto, tmp_path):
    """A small in-flight bound and the wall clock: partitions pause until decisions
    free room; nothing is decided early and every span is taken."""
    from traceguard.config import load_config
    from traceguard.consume import Consumer

    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, scenario_proto, traces, None)
    config = load_config(None, {
        "consume.bootstrap_servers": kafka_bootstrap, "consume.group": f"g_{traces}",
        "consume.traces_topic": traces, "consume.logs_topic": "", "consume.anomalies_topic": "",
        "consume.initial_offset": "earliest", "consume.exit_at_end": True,
        "assembler.max_spans_in_flight": 1500, "assembler.decision_wait": "300ms", "assembler.max_trace_age": "1s",
    }, environ={})
    consumer = Consumer(config)
    stop = threading.Event()
    guard = threading.Timer(120, stop.set)
    guard.start()
    try:
        assert consumer.run(stop) == 0
    finally:
        guard.cancel()
    assert not stop.is_set(), "did not catch up in time"
    metrics = consumer.pipeline.metrics
    assert metrics.get("traceguard_kafka_backpressure_pauses_total") > 0
    assert metrics.get("traceguard_traces_evicted_total") == 0
    received = metrics.get("traceguard_spans_received_total")  # every span is assembled or reported late
    taken = metrics.get("traceguard_spans_accepted_total") + metrics.get("traceguard_late_spans_total")
    assert taken == received > 15_000


def test_a_send_refused_while_the_broker_is_away_fails_the_flush():
    """The producer's buffer still full after max_block_ms (here: no broker at all)
    raises from ``send``; the writer must remember it, or a commit after it (offsets,
    the write-ahead log's trim) would pass over records that never reached the topic."""
    from kafka import KafkaProducer

    from traceguard.metrics import Metrics
    from traceguard.sinks.kafka import TopicWriter

    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", max_block_ms=300, api_version=(2, 8))
    metrics = Metrics()
    writer = TopicWriter(producer, "nowhere", metrics, "decided traces")
    try:
        writer.send(b"key", b"value")  # does not raise
        writer.send(b"key", b"more")  # after a failure: not sent, no second wait on the broker
        with pytest.raises(OSError, match="writing decided traces to nowhere failed"):
            writer.flush()
        assert metrics.get("traceguard_kafka_produce_failures_total", topic="nowhere") == 1
        assert writer.failing is not None
    finally:
        producer.close(timeout=1)


@pytest.mark.parametrize("command", ["consume", "serve"])
def test_no_broker_at_the_address_is_said_plainly(tmp_path, command):
    args = ["--bootstrap-servers", "127.0.0.1:1", "--decided-topic", "decided"]
    if command == "serve":
        args += ["--state-dir", str(tmp_path), "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                 "--api-listen", "127.0.0.1:0"]
    done = subprocess.run([sys.executable, "-m", "traceguard", command, *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert f"traceguard: cannot {command}: no Kafka broker answers at 127.0.0.1:1" in done.stderr


def consume_in_process(bootstrap: str, traces: str, logs: str, work: Path, name: str, full: bool, **settings):
    """(exit status, Consumer) of an in-process ``consume --exit-at-end`` (event time) into
    ``work/state`` and ``work/<name>.jsonl``; ``full``: the store cannot grow (SQLite's
    page limit stands in for a full disk)."""
    from traceguard.config import load_config
    from traceguard.consume import Consumer

    config = load_config(None, {
        "consume.bootstrap_servers": bootstrap, "consume.group": f"g_{traces}",
        "consume.traces_topic": traces, "consume.logs_topic": logs, "consume.anomalies_topic": "",
        "consume.initial_offset": "earliest", "consume.exit_at_end": True, "consume.time": "event",
        "consume.state_dir": str(work / "state"), "consume.out": str(work / f"{name}.jsonl"), **settings,
    }, environ={})
    consumer = Consumer(config)
    if full:
        pages = consumer.store._db.execute("PRAGMA page_count").fetchone()[0]
        consumer.store._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    return consumer.run(threading.Event()), consumer


def stored_findings(work: Path) -> dict[str, Anomaly]:
    """The findings store's findings, by id."""
    from traceguard.sinks.sqlite import SqliteStore

    return {a.id: a for a in SqliteStore(work / "state" / "anomalies.sqlite").query(limit=1_000_000)[0]}


def test_findings_the_store_cannot_write_stop_the_commit_and_are_found_again(kafka_bootstrap, scenario_proto,
                                                                              tmp_path):
    """A full disk under ``--state-dir``: the store holds the findings back, so offsets
    are not committed past them and consume ends with an error; run again with room, it
    reads them again and the store has them all."""
    traces, logs = topics(kafka_bootstrap)
    feed(kafka_bootstrap, scenario_proto, traces, logs)
    status, first = consume_in_process(kafka_bootstrap, traces, logs, tmp_path, "first", full=True)
    assert status == 1
    assert first.pipeline.metrics.get("traceguard_store_backlog") > 0
    before = committed(kafka_bootstrap, f"g_{traces}")
    held = set(findings(tmp_path / "first.jsonl"))
    assert held
    status, second = consume_in_process(kafka_bootstrap, traces, logs, tmp_path, "second", full=False)
    assert status == 0 and committed(kafka_bootstrap, f"g_{traces}") > before
    stored = stored_findings(tmp_path).keys()
    assert held <= stored and set(findings(tmp_path / "second.jsonl")) <= stored
    assert second.pipeline.metrics.get("traceguard_store_backlog") == 0
