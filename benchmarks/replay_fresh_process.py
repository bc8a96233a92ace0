"""Replay throughput inside a fresh process set up as ``traceguard replay`` sets
itself up, with and without its garbage-collector tuning (traceguard.runtime).

``replay_throughput`` measures in the process that generated the scenario;
this one writes the same traffic to files, then for each round starts one
child per mode that imports what the command imports, applies (or not)
``tune_gc``, and times ``run_replay`` of the protobuf and the JSON-lines file
with the structural detectors only, against ``FromString`` of the same bodies
(median of 3) measured in that child just before each replay.

Run ``python -m benchmarks.replay_fresh_process [--traces 8000] [--rounds 3]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def child(directory: Path, tuned: bool) -> dict:
    from traceguard import cli  # noqa: F401  (the command's imports, before tuning)
    from traceguard.config import PipelineConfig
    from traceguard.replay import run_replay
    from traceguard.runtime import tune_gc
    from traceguard.sinks.jsonl import JsonlSink

    from benchmarks.kafka_feed import read_length_prefixed

    if tuned:
        tune_gc()
    config = PipelineConfig()
    config = config.model_copy(update={"learned": config.learned.model_copy(update={"enabled": False})})
    bodies = [r.SerializeToString() for r in read_length_prefixed(directory / "traces.pb", ExportTraceServiceRequest)]
    spans = sum(len(ss.spans) for b in bodies for rs in ExportTraceServiceRequest.FromString(b).resource_spans
                for ss in rs.scope_spans)

    def ceiling() -> float:
        started = time.perf_counter()
        for body in bodies:
            ExportTraceServiceRequest.FromString(body)
        return spans / (time.perf_counter() - started)

    ratios = {}
    for name in ("traces.pb", "traces.jsonl"):
        parse = statistics.median(ceiling() for _ in range(3))
        started = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            run_replay([directory / name], [], config, [JsonlSink(devnull)], warn=lambda _: None)
        ratios[name] = round(spans / (time.perf_counter() - started) / parse, 4)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, tuned=not args.plain)))
        return

    from benchmarks.common import scenario_requests
    from benchmarks.scenario import length_prefixed, otlp_json

    runs: dict[str, dict[str, list[float]]] = {"plain": {}, "tuned": {}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        requests = scenario_requests(args.traces)
        (directory / "traces.pb").write_bytes(b"".join(length_prefixed(r) for r in requests))
        (directory / "traces.jsonl").write_text("".join(otlp_json(r) + "\n" for r in requests))
        for _ in range(args.rounds):
            for mode in ("plain", "tuned"):
                command = [sys.executable, "-m", "benchmarks.replay_fresh_process", "--child", str(directory)]
                result = subprocess.run(command + (["--plain"] if mode == "plain" else []),
                                        capture_output=True, text=True, check=True)
                for name, ratio in json.loads(result.stdout).items():
                    runs[mode].setdefault(name, []).append(ratio)
    print(json.dumps({
        "benchmark": "replay_fresh_process", "traces": args.traces, "detectors": "structural",
        "ratio_median": {mode: {name: statistics.median(values) for name, values in by_file.items()}
                         for mode, by_file in runs.items()},
        "targets": {"traces.pb": 0.15, "traces.jsonl": 0.05},
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
