"""End to end through a real OpenTelemetry Collector built from source (deploy/collector/build).

Route A: scenario traffic → real OTel SDK OTLP/gRPC exporters → Collector
(deploy/collector/kafka.yaml) → the repo's Kafka broker (4 partitions, keyed by
trace id) → two ``traceguard consume`` in one group (event time, exit at end);
then the same with one consumer killed (kill -9) mid-stream and restarted, as
a Deployment would. Compared with ``traceguard replay`` of the same batches,
written to files as they were sent.

Route B: the same kind of traffic → Collector (deploy/collector/loadbalancing.yaml,
``routing_key: traceID``) → three ``traceguard serve``; combined findings vs
replay, and each trace's findings from exactly one instance.

Learned state is per instance (each learns from its share of the traces), so
the equality is asserted for the per-trace kinds and the learned kinds are
reported side by side. Prints one JSON object; exits 1 if a route disagrees.

Run ``python -m benchmarks.e2e_collector [--traces N] [--route a|b|both]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

from benchmarks.kafka_feed import committed, create_topics
from benchmarks.scenario import LIVE_FAULTS, ScenarioConfig, generate, length_prefixed
from benchmarks.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
LEARNED = {"missing_expected_span", "slow_stage", "latency_regression", "trace_outlier"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Collector:
    """The built Collector with one of the deploy/ configs, on localhost ports."""

    def __init__(self, binary: str, config: str, env: dict[str, str], log: Path, *sets: str) -> None:
        self.grpc = free_port()
        environ = {**os.environ, "OTLP_GRPC_LISTEN": f"127.0.0.1:{self.grpc}",
                   "OTLP_HTTP_LISTEN": f"127.0.0.1:{free_port()}", **env}
        self.log = log
        self.process = subprocess.Popen([binary, "--config", str(ROOT / "deploy/collector" / config),
                                         *(f"--set={s}" for s in sets)],
                                        env=environ, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        wait_port(self.grpc, self.process)

    def stop(self) -> None:
        """SIGTERM: the Collector drains its queues before it exits."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def send(config: ScenarioConfig, endpoint: str, files: Path) -> dict:
    """The scenario through the SDK's OTLP/gRPC exporters; every batch also to replay files."""
    files.mkdir(parents=True, exist_ok=True)
    spans_exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    logs_exporter = OTLPLogExporter(endpoint=endpoint, insecure=True)
    with open(files / "traces.pb", "wb") as traces, open(files / "logs.pb", "wb") as logs:
        def spans(_, batch):
            traces.write(length_prefixed(encode_spans(batch)))
            assert spans_exporter.export(batch).name == "SUCCESS"

        def records(_, batch):
            logs.write(length_prefixed(encode_logs(batch)))
            assert logs_exporter.export(batch).name == "SUCCESS"

        generated = generate(config, spans, records)
    spans_exporter.shutdown()
    logs_exporter.shutdown()
    return {"traces": generated.traces, "spans": generated.spans, "logs": generated.logs}


def replay(files: Path, out: Path, *args: str) -> dict[str, dict]:
    subprocess.run([sys.executable, "-m", "traceguard", "replay", files / "traces.pb", "--logs", files / "logs.pb",
                    "--out", out, *args], check=True, capture_output=True)
    return read(out)


def read(path: Path) -> dict[str, dict]:
    found = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        finding = json.loads(line)
        found[finding["id"]] = finding
    return found


def compare(got: dict[str, dict], expected: dict[str, dict]) -> dict:
    def kinds(findings, learned):
        return dict(collections.Counter(f["kind"] for f in findings.values() if (f["kind"] in LEARNED) == learned))

    per_trace = {k for k, v in expected.items() if v["kind"] not in LEARNED}
    got_per_trace = {k for k, v in got.items() if v["kind"] not in LEARNED}
    return {
        "per_trace_equal": per_trace == got_per_trace,
        "per_trace_missing": len(per_trace - got_per_trace), "per_trace_extra": len(got_per_trace - per_trace),
        "per_trace_kinds": kinds(expected, False),
        "learned_kinds_replay": kinds(expected, True), "learned_kinds_here": kinds(got, True),
    }



def route_a(binary: str, bootstrap: str, traces: int, work: Path, kill: bool) -> dict:
    work.mkdir(parents=True)
    suffix = uuid.uuid4().hex[:8]
    spans_topic, logs_topic = f"otlp_spans_{suffix}", f"otlp_logs_{suffix}"
    create_topics(bootstrap, {spans_topic: 4, logs_topic: 4})
    collector = Collector(binary, "kafka.yaml", {"KAFKA_BROKERS": bootstrap, "TRACES_TOPIC": spans_topic,
                                                 "LOGS_TOPIC": logs_topic}, work / "collector-a.log",
                          # one producer at a time keeps each partition in the order the spans came
                          "exporters.kafka.sending_queue.num_consumers=1")
    sent = send(ScenarioConfig(traces=traces, seed=21, duration_s=traces * 0.6, fault_rate=0.1),
                f"127.0.0.1:{collector.grpc}", work / "files-a")
    collector.stop()
    expected = replay(work / "files-a", work / "replay-a.jsonl")
    group = f"traceguard_{suffix}"
    args = [sys.executable, "-m", "traceguard", "consume", "--bootstrap-servers", bootstrap, "--group", group,
            "--traces-topic", spans_topic, "--logs-topic", logs_topic, "--time", "event", "--exit-at-end",
            "--initial-offset", "earliest", "--anomalies-topic", ""]
    env = {**os.environ, "TRACEGUARD_CONSUME__COMMIT_INTERVAL": "200ms",
           "TRACEGUARD_CONSUME__HEARTBEAT_INTERVAL": "500ms", "TRACEGUARD_CONSUME__SESSION_TIMEOUT": "6s"}
    outs = [work / f"{name}-a.jsonl" for name in ("first", "second", "replacement")]

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(out.with_suffix(".log"), "w"))

    started = time.monotonic()
    first = start(outs[0])
    while committed(bootstrap, group) == 0:
        time.sleep(0.05)
    second = start(outs[1])
    killed = None
    if kill:
        while committed(bootstrap, group) < 200:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed = committed(bootstrap, group)
        first = start(outs[2])  # the Deployment's replacement pod
    codes = [first.wait(600), second.wait(600)]
    found = {}
    for out in outs:
        found.update(read(out))
    result = {"sent": sent, "messages_committed_at_kill": killed, "exit_codes": codes,
              "seconds": round(time.monotonic() - started, 1), **compare(found, expected)}
    result["rebalanced"] = any("partitions revoked" in out.with_suffix(".log").read_text()
                               for out in outs if out.with_suffix(".log").exists())
    return result


def route_b(binary: str, traces: int, work: Path) -> dict:
    work.mkdir(parents=True)
    servers = [ServeProcess(work / f"state-{i}", "--decision-wait", "2s", "--max-trace-age", "4s")
               for i in range(3)]
    try:
        backends = "[" + ", ".join(f"127.0.0.1:{s.grpc}" for s in servers) + "]"
        collector = Collector(binary, "loadbalancing.yaml", {"TRACEGUARD_BACKENDS": backends},
                              work / "collector-b.log")
        sent = send(ScenarioConfig(traces=traces, seed=22, duration_s=traces * 0.6, fault_rate=0.1,
                                   cooldown_s=30, faults=LIVE_FAULTS),
                    f"127.0.0.1:{collector.grpc}", work / "files-b")
        collector.stop()
        expected = replay(work / "files-b", work / "replay-b.jsonl", "--decision-wait", "2s",
                          "--max-trace-age", "4s")
        per_instance = []
        for server in servers:  # everything is decided once max trace age has passed on every instance
            server.wait_for(lambda s=server: s.client.get("/metrics").text.count(
                "traceguard_traces_in_flight 0.0"), timeout=60, what="all traces decided")
            per_instance.append({f["id"]: f for f in server.anomalies()})
    finally:
        for server in servers:
            server.stop()
    traces_by_instance = [{f["trace_id"] for f in found.values() if f["trace_id"]} for found in per_instance]
    overlap = set.intersection(*traces_by_instance) if traces_by_instance else set()
    pairwise = sum(len(a & b) for i, a in enumerate(traces_by_instance) for b in traces_by_instance[i + 1:])
    found = {k: v for instance in per_instance for k, v in instance.items()}
    return {"sent": sent, "findings_per_instance": [len(i) for i in per_instance],
            "traces_found_on_two_instances": pairwise, "in_all_three": len(overlap), **compare(found, expected)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=3000)
    parser.add_argument("--route", choices=("a", "b", "both"), default="both")
    parser.add_argument("--keep", type=Path, help="work here and keep the files and logs (default: a temporary folder)")
    args = parser.parse_args()
    binary = subprocess.run([str(ROOT / "deploy/collector/build")], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    result: dict = {"benchmark": "e2e_collector", "collector": "otelcol-traceguard (ocb v0.160.0)"}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        if args.route in ("a", "both"):
            env = {**os.environ, "KAFKA_HOME": str(ROOT / ".kafka-e2e")}
            bootstrap = subprocess.run([str(ROOT / "scripts/kafka"), "start"], check=True, capture_output=True,
                                       text=True, env=env).stdout.strip().splitlines()[-1]
            try:
                result["route_a"] = route_a(binary, bootstrap, args.traces, work / "a", kill=False)
                result["route_a_kill"] = route_a(binary, bootstrap, args.traces, work / "a-kill", kill=True)
            finally:
                subprocess.run([str(ROOT / "scripts/kafka"), "stop"], env=env, capture_output=True)
        if args.route in ("b", "both"):
            result["route_b"] = route_b(binary, args.traces, work / "b")
    print(json.dumps(result, indent=2))
    routes = [v for k, v in result.items() if k.startswith("route")]
    ok = all(r["per_trace_equal"] for r in routes) and all(
        r.get("traces_found_on_two_instances", 0) == 0 for r in routes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
