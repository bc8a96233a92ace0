"""Where replay's CPU time goes, stage by stage: a sampling profile (py-spy) summed per pipeline stage.

``traceguard replay`` with every detector on, started from models trained on
another seed of the scenario, runs under ``py-spy record`` (500 samples a
second, wall-clock stacks of the busy thread). Each sample is given to the
stage of its deepest traceguard frame: ``sources`` (reading the input),
``decode``, ``assemble``, each ``detect/<kind>`` (and the ``models`` code a
detector calls, learning included, goes to that detector), ``correlate``
(incidents), ``link`` (the log index), ``sinks``, ``pipeline`` (dispatch);
library frames (numpy, scikit-learn, protobuf) go to the traceguard frame
that called them; start-up imports are a stage of their own.

With ``--serve`` the profile is of a real ``traceguard serve`` (same trained
models, every detector, write-ahead log on) taking the scenario's spans over
OTLP/gRPC as ``peer_collector`` sends them, from the warm-up's end until
every trace is decided; every thread is sampled (gRPC workers, the ticker,
the forest's fit thread). Code under ``sources/`` is split by module
(``otlp_grpc``: the receiver, ``live``: the bounds and the lock, ``wal``: the
write-ahead log); "other" is what runs outside traceguard's frames (gRPC's
own threads).

Needs ``py-spy`` (``pip install py-spy``; not a dependency of traceguard).
Run ``python -m benchmarks.profile_stages [--traces N] [--py-spy PATH] [--serve]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.scenario import ScenarioConfig, write_scenario

RATE = 200
_FRAME = re.compile(r"^(.*) \((.*?):(\d+)\)$")


def stage_of(stack: list[str]) -> str:
    """The stage a sampled stack (root first) belongs to."""
    files = [match.group(2) if (match := _FRAME.match(frame)) else "" for frame in stack]
    if any(f.endswith("importlib._bootstrap>") for f in files):
        return "start-up: imports"
    if "traceguard/models/store.py" in files:
        return "start-up: loading the models"
    ours = [f for f in files if f.startswith("traceguard/")]
    if not ours:
        return "other"
    detectors = [f for f in ours if f.startswith("traceguard/detect/") and f != "traceguard/detect/base.py"]
    area = ours[-1].split("/")[1]
    if area in ("models", "pipeline.py", "detect", "metrics.py") and detectors:
        return "detect: " + Path(detectors[-1]).stem
    if area == "sources":
        return "sources: " + Path(ours[-1]).stem
    return area.removesuffix(".py")


def profile_serve(py_spy: str, tmp: Path, raw: Path, traces: int) -> None:
    """``py-spy`` on a live ``serve`` from the end of the warm-up until every trace is decided."""
    from benchmarks.common import scenario_requests
    from benchmarks.peer_collector import send, warm
    from benchmarks.serve_process import ServeProcess

    requests = scenario_requests(traces)
    bodies = [r.SerializeToString() for r in requests]
    traces = len({span.trace_id for r in requests for rs in r.resource_spans for ss in rs.scope_spans
                  for span in ss.spans})  # now: how many traces to wait for
    server = ServeProcess(tmp / "state", "--decision-wait", "2s", "--max-trace-age", "4s", "--model-dir",
                          str(tmp / "models"), env={"TRACEGUARD_SERVE__TICK": "100ms"})
    try:
        warm(server.grpc, bodies[0])
        decided = lambda: server.metric("traceguard_traces_decided_total")  # noqa: E731
        server.wait_for(lambda: decided() >= 1, timeout=120, what="the warm-up trace decided")
        spy = subprocess.Popen([py_spy, "record", "--nonblocking", "--format", "raw", "-r", str(RATE), "-o", str(raw),
                                "--pid", str(server.process.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        send(server.grpc, bodies[1:])
        server.wait_for(lambda: decided() >= traces, timeout=600, what="every trace decided")
        spy.send_signal(signal.SIGINT)
        spy.wait(120)
    finally:
        server.stop(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--serve", action="store_true", help="profile a live serve under the load instead of a replay")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, seed in (("train", 8), ("run", 7)):
            write_scenario(tmp / name, ScenarioConfig(traces=args.traces, seed=seed, duration_s=args.traces / 3),
                           proto=True)
        subprocess.run([sys.executable, "-m", "traceguard", "train", str(tmp / "train" / "traces.pb"), "--logs",
                        str(tmp / "train" / "logs.pb"), "--model-dir", str(tmp / "models"), "--no-progress"],
                       check=True, capture_output=True)
        raw = tmp / "raw.txt"
        if args.serve:
            profile_serve(args.py_spy, tmp, raw, args.traces)
        else:
            subprocess.run([args.py_spy, "record", "--nonblocking", "--format", "raw", "-r", str(RATE), "-o", str(raw), "--",
                            sys.executable, "-m", "traceguard", "replay", str(tmp / "run" / "traces.pb"), "--logs",
                            str(tmp / "run" / "logs.pb"), "--model-dir", str(tmp / "models"), "--out", "/dev/null",
                            "--no-progress"], check=True, capture_output=True)
        samples: Counter[str] = Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples[stage_of(stack.split(";"))] += int(count)
    total = sum(samples.values())
    print(json.dumps({
        "benchmark": "profile_stages", "of": "serve" if args.serve else "replay", "traces": args.traces, "samples": total, "rate_hz": RATE,
        "stages": {stage: {"seconds": round(n / RATE, 2), "share": round(n / total, 4)}
                   for stage, n in samples.most_common()},
    }, indent=1))


if __name__ == "__main__":
    main()
