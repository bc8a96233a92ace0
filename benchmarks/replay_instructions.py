"""Replay cost in CPU instructions: a figure other processes on the machine do not move.

Wall-clock rates on a shared 2-core machine spread ±25 % between runs of the
same code. Instructions retired are counted exactly by valgrind
(``cachegrind --cache-sim=no``), whatever else runs. Each figure is half the
difference between a child process doing the work three times and one doing
it once, so start-up and imports cancel. They ignore cache misses and stalls: a
proxy for time, not time. Read the ceiling row as the control: in an A/B it
is identical code, and it still moved by up to 11 % between two source trees
(the garbage collector walks heaps of different sizes), so differences of
that order are not the replay's.

Measured on the benchmark input of ``replay_throughput`` (length-prefixed
OTLP protobuf and OTLP/JSON lines): the ceiling (``FromString`` over every
message), replay with the structural detectors, replay with every detector,
and replay with every detector and the scenario's log records (as its SDKs
export them; still per span, the logs' cost included).
``--compare SRC`` measures a second source tree (e.g. a ``git worktree`` of
an earlier commit) on the same input, for a same-input A/B.

Run ``python -m benchmarks.replay_instructions [--traces N] [--compare SRC]``
(needs valgrind; about 10 minutes, two children at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("ceiling", "structural", "structural_json", "every", "every_with_logs")


def child(mode: str, path: Path, times: int) -> None:
    """The measured work, ``times`` over (runs inside valgrind)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from traceguard.config import PipelineConfig
    from traceguard.replay import run_replay
    from traceguard.runtime import tune_gc
    from traceguard.sinks import JsonlSink

    config = PipelineConfig()
    if mode.startswith("structural"):
        config = config.model_copy(update={"learned": config.learned.model_copy(update={"enabled": False})})
    tune_gc()
    if mode == "ceiling":
        data = path.read_bytes()
        bodies, at = [], 0
        while at < len(data):
            size = int.from_bytes(data[at:at + 4], "big")
            bodies.append(data[at + 4:at + 4 + size])
            at += 4 + size
        for _ in range(times):
            for body in bodies:
                ExportTraceServiceRequest.FromString(body)
        return
    logs = [path.with_name("logs.pb")] if mode == "every_with_logs" else []
    with open(os.devnull, "w") as devnull:
        for _ in range(times):
            run_replay([path], logs, config, [JsonlSink(devnull)])


def instructions(src: Path, mode: str, path: Path, times: int) -> int:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               sys.executable, "-m", "benchmarks.replay_instructions", "--child", mode, str(path), str(times)]
    # a fixed hash seed: string hashing moves dict probing and GC work by a few per cent between runs
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}", "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)[1].replace(",", ""))


def measure(src: Path, files: dict[str, Path]) -> dict[str, int]:
    """Instructions of one pass of each mode's work: the mean of the second and third
    (a single pass of the ceiling moved by up to 40 % from one pass to the next)."""
    jobs = [(mode, times) for mode in MODES for times in (1, 3)]
    with ThreadPoolExecutor(2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: instructions(src, job[0], files[job[0]], job[1]), jobs)))
    return {mode: (counts[(mode, 3)] - counts[(mode, 1)]) // 2 for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--compare", type=Path, help="a second source tree (its src/ directory) to measure")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FILE", "TIMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (apt-get install valgrind)")
    from benchmarks.common import scenario_requests
    from benchmarks.scenario import length_prefixed, otlp_json

    log_requests: list = []
    requests = scenario_requests(args.traces, logs=log_requests)
    spans = sum(len(ss.spans) for r in requests for rs in r.resource_spans for ss in rs.scope_spans)
    records = sum(len(sl.log_records) for r in log_requests for rl in r.resource_logs for sl in rl.scope_logs)
    with tempfile.TemporaryDirectory() as tmp:
        proto, jsonl = Path(tmp) / "traces.pb", Path(tmp) / "traces.jsonl"
        proto.write_bytes(b"".join(length_prefixed(r) for r in requests))
        jsonl.write_text("".join(otlp_json(r) + "\n" for r in requests))
        (Path(tmp) / "logs.pb").write_bytes(b"".join(length_prefixed(r) for r in log_requests))
        files = {"ceiling": proto, "structural": proto, "structural_json": jsonl, "every": proto,
                 "every_with_logs": proto}
        trees = {"this": ROOT / "src", **({"compare": args.compare} if args.compare else {})}
        results = {name: measure(src, files) for name, src in trees.items()}
    report = {"benchmark": "replay_instructions", "traces": args.traces, "spans": spans, "log_records": records,
              "instructions_per_span": {name: {mode: round(count / spans) for mode, count in counts.items()}
                                        for name, counts in results.items()},
              "ratio_to_ceiling": {name: {mode: round(counts["ceiling"] / counts[mode], 4) for mode in MODES[1:]}
                                   for name, counts in results.items()}}
    if args.compare:
        report["this_vs_compare"] = {mode: round(results["this"][mode] / results["compare"][mode] - 1, 4)
                                     for mode in MODES}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
