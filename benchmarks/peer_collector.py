"""traceguard next to the OpenTelemetry Collector doing the same kind of work: spans per CPU-second.

The peer is the Collector that ``deploy/collector/build`` makes (ocb, v0.160.0,
with the tail_sampling processor and the nop exporter in its builder config),
running otlp receiver → tail_sampling (decision_wait 2 s; a latency and a
status-code policy) → nop: it too holds every trace until it can be judged
whole, then judges it. ``traceguard serve`` runs with every detector on and
models trained beforehand (``traceguard train`` on another seed of the
scenario), decision wait 2 s; and, for the structural figure, with
``learned.enabled = false``.

Each process gets the same load: the scenario's traffic as pre-serialized
512-span OTLP/gRPC requests (8,000 traces, ~64,400 spans), sent back to back
on 2 streams. Its CPU time is read from ``/proc/PID/stat`` (user + system, all
threads) after the warm-up request and again once all of it is processed (both:
the decision wait over and the CPU time still for a second; traceguard's
/metrics is read only then, to check that every trace was decided: polling
it during the load cost 5 % of its CPU), so start-up and model loading are
not counted.
Rounds interleave the configurations; medians are reported, and the ratios of
traceguard's spans per CPU-second to the Collector's at GOMAXPROCS=1 (the
issue's reference) and 2.

Run ``python -m benchmarks.peer_collector [--rounds N] [--traces N]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from benchmarks.common import scenario_requests, send_back_to_back
from benchmarks.scenario import ScenarioConfig, write_scenario
from benchmarks.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TICKS = os.sysconf("SC_CLK_TCK")
COLLECTOR_CONFIG = """\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{port}
processors:
  tail_sampling:
    decision_wait: 2s
    num_traces: 100000
    expected_new_traces_per_sec: 5000
    policies:
      - {{name: slow, type: latency, latency: {{threshold_ms: 500}}}}
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
exporters:
  nop: {{}}
service:
  telemetry:
    logs: {{level: warn}}
    metrics: {{level: none}}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [tail_sampling]
      exporters: [nop]
"""


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def send(port: int, bodies: list[bytes], streams: int = 2) -> None:
    """The load after the warm-up: back to back on ``streams``; every request must be taken."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary(METHOD, request_serializer=None,
                                     response_deserializer=ExportTraceServiceResponse.FromString)
        _, errors = send_back_to_back(export, bodies, streams)
    if errors:
        raise RuntimeError(f"{len(errors)} requests refused: {sorted(set(errors))}")


def warm(port: int, body: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.unary_unary(METHOD, request_serializer=None,
                            response_deserializer=ExportTraceServiceResponse.FromString)(body, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_collector(binary: str, bodies: list[bytes], gomaxprocs: int) -> float:
    """CPU seconds the Collector spent on the load."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "collector.yaml"
        config.write_text(COLLECTOR_CONFIG.format(port=port))
        process = subprocess.Popen([binary, "--config", str(config)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env={**os.environ, "GOMAXPROCS": str(gomaxprocs)})
        try:
            warm(port, bodies[0])
            time.sleep(3)  # the warm-up trace's decision
            before = cpu_seconds(process.pid)
            send(port, bodies[1:])
            time.sleep(2.5)  # decision_wait of the last traces
            last = cpu_seconds(process.pid)
            while True:  # until its CPU time stands still for a second (decisions done)
                time.sleep(1)
                now = cpu_seconds(process.pid)
                if now - last < 0.02:
                    return now - before
                last = now
        finally:
            process.terminate()
            process.wait(30)


def run_traceguard(bodies: list[bytes], traces: int, model_dir: Path, learned: bool) -> float:
    """CPU seconds ``traceguard serve`` spent on the load (every trace decided)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TRACEGUARD_SERVE__TICK": "100ms", "TRACEGUARD_SERVE__WAL": "true"}
        if not learned:
            env["TRACEGUARD_LEARNED__ENABLED"] = "false"
        server = ServeProcess(Path(tmp) / "state", "--decision-wait", "2s", "--max-trace-age", "4s",
                              "--model-dir", str(model_dir), env=env)
        try:
            warm(server.grpc, bodies[0])
            decided = lambda: server.metric("traceguard_traces_decided_total")  # noqa: E731
            server.wait_for(lambda: decided() >= 1, timeout=120, what="the warm-up trace decided")
            before = cpu_seconds(server.process.pid)
            send(server.grpc, bodies[1:])
            # As for the Collector: until its CPU time stands still for a second, without
            # scraping /metrics meanwhile (ten scrapes a second cost it 5 % more CPU).
            time.sleep(2.5)
            last = cpu_seconds(server.process.pid)
            while True:
                time.sleep(1)
                now = cpu_seconds(server.process.pid)
                if now - last < 0.02:
                    break
                last = now
            if decided() < traces:  # settled with traces still waiting for max_trace_age: wait, then count again
                server.wait_for(lambda: decided() >= traces, timeout=600, what="every trace decided")
                now = cpu_seconds(server.process.pid)
            return now - before
        finally:
            server.stop(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--traces", type=int, default=8000)
    args = parser.parse_args()
    binary = subprocess.run([str(ROOT / "deploy" / "collector" / "build")], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    requests = scenario_requests(args.traces)
    bodies = [r.SerializeToString() for r in requests]
    warm_spans = sum(len(ss.spans) for rs in requests[0].resource_spans for ss in rs.scope_spans)
    spans = sum(len(ss.spans) for r in requests[1:] for rs in r.resource_spans for ss in rs.scope_spans)
    trace_ids = {span.trace_id for r in requests for rs in r.resource_spans for ss in rs.scope_spans for span in ss.spans}
    with tempfile.TemporaryDirectory() as tmp:
        training = Path(tmp) / "training"
        write_scenario(training, ScenarioConfig(traces=args.traces, seed=8, duration_s=args.traces / 3), proto=True)
        model_dir = Path(tmp) / "models"
        subprocess.run([sys.executable, "-m", "traceguard", "train", str(training / "traces.pb"), "--logs",
                        str(training / "logs.pb"), "--model-dir", str(model_dir), "--no-progress"],
                       check=True, capture_output=True)
        configurations = {
            "collector_tail_sampling_gomaxprocs_1": lambda: run_collector(binary, bodies, 1),
            "collector_tail_sampling_gomaxprocs_2": lambda: run_collector(binary, bodies, 2),
            "traceguard_every_detector_trained": lambda: run_traceguard(bodies, len(trace_ids), model_dir, True),
            "traceguard_structural": lambda: run_traceguard(bodies, len(trace_ids), model_dir, False),
        }
        cpu: dict[str, list[float]] = {name: [] for name in configurations}
        for _ in range(args.rounds):
            for name, run in configurations.items():
                cpu[name].append(round(run(), 3))
    rate = {name: round(spans / statistics.median(seconds)) for name, seconds in cpu.items()}
    reference = {n: rate[f"collector_tail_sampling_gomaxprocs_{n}"] for n in (1, 2)}
    print(json.dumps({
        "benchmark": "peer_collector", "collector": binary, "traces": len(trace_ids), "spans_measured": spans,
        "warm_up_spans": warm_spans, "rounds": args.rounds, "cpu_seconds": cpu,
        "spans_per_cpu_second_median": rate,
        "traceguard_vs_collector": {
            f"{name}_vs_gomaxprocs_{n}": round(rate[name] / reference[n], 3)
            for name in ("traceguard_every_detector_trained", "traceguard_structural") for n in (1, 2)},
        "targets_vs_gomaxprocs_1": {"traceguard_every_detector_trained": 1.0, "traceguard_structural": 2.0},
    }, indent=1))


if __name__ == "__main__":
    main()
