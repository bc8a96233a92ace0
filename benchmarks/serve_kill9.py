"""kill -9 of ``traceguard serve`` at random points: no acknowledged span lost.

Sends the scenario's traffic with faults in 10 % of the traces (512-span
OTLP/HTTP protobuf requests, one at a time) to a real ``traceguard serve`` twice: once uninterrupted, once killed
with SIGKILL right after the acknowledgement of ``--kills`` randomly chosen
requests, each time restarted on the same state dir and sent the rest. Both
end with SIGTERM (everything in flight decided). Compares the finding ids in
the two stores: the per-trace ones by kind, and the stage-level ones.

With ``--trained`` both runs start from models trained (``traceguard
train``) on another seed, 2 % of the requests after the forests' warm-up are
N+1 or 20x slow, and the forests refit every 100 normal traces, so the learned
kinds fire and what the forest learns between snapshots matters. Learned
kinds could differ for a reason other than loss: the learned state is
snapshotted every ``serve.snapshot_interval``, and a killed process restarts
from the last snapshot plus what the write-ahead log replays, not from the
state it had. They are reported apart.

Run ``python -m benchmarks.serve_kill9 [--traces N] [--kills K] [--seed S] [--trained]``; prints JSON
(the serve processes' errors and undecided-at-stop warnings go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import scenario_requests
from benchmarks.scenario import ScenarioConfig, write_scenario
from benchmarks.serve_process import ServeProcess

STRUCTURAL = {"missing_parent", "missing_root", "unfinished_span", "context_outlived_parent",
              "unpaired_client_span", "missing_expected_span", "late_span"}
ARGS = ("--decision-wait", "5s", "--max-trace-age", "30s")
# every per-trace finding stored, also those an incident explains: what is compared is what was found
# every run ends with everything decided: a generous shutdown_timeout (the SIGTERM benchmark measures that bound)
ENV = {"TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": "1000000000", "TRACEGUARD_SERVE__WAL_COMMIT_INTERVAL": "200ms",
       "TRACEGUARD_SERVE__SHUTDOWN_TIMEOUT": "300s"}


def _send(server: ServeProcess, body: bytes) -> None:
    """One export, retried while the server says so (as an exporter does)."""
    for _ in range(600):
        response = httpx.post(f"http://127.0.0.1:{server.http}/v1/traces", content=body,
                              headers={"content-type": "application/x-protobuf"}, timeout=60)
        if response.status_code == 200:
            return
        if response.status_code not in (429, 503):
            raise RuntimeError(f"export refused: {response.status_code} {response.text[:200]}")
        time.sleep(0.1)
    raise RuntimeError("export still refused after 60 s")


def _found(state: Path) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(state / "anomalies.sqlite") as db:
        return {id_: (kind, trace_id) for id_, kind, trace_id in
                db.execute("SELECT id, kind, trace_id FROM anomalies")}


def run(bodies: list[bytes], state: Path, kill_after: set[int], args: tuple[str, ...],
        env: dict[str, str]) -> tuple[dict, int]:
    server = ServeProcess(state, *args, env=env)
    replayed = 0
    for index, body in enumerate(bodies):
        _send(server, body)
        if index in kill_after:
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(60)
            server.client.close()
            server = ServeProcess(state, *args, env=env)
            replayed += sum(int(line.split("write-ahead log: ")[1].split()[0])
                            for line in server.lines if "write-ahead log: " in line)
    code = server.stop(timeout=120)
    if code != 0:
        raise RuntimeError(f"serve exited {code}:\n{''.join(server.lines[-30:])}")
    for line in server.lines:
        if "not decided" in line or "Traceback" in line or "ERROR" in line:
            print(line.rstrip(), file=sys.stderr)
    return _found(state), replayed


def train(tmp: Path, traces: int) -> Path:
    """Models trained (``traceguard train``) on another seed of the scenario, with its logs."""
    training, model_dir = tmp / "training", tmp / "models"
    write_scenario(training, ScenarioConfig(traces=traces, seed=8, duration_s=traces / 3), proto=True)
    subprocess.run([sys.executable, "-m", "traceguard", "train", str(training / "traces.pb"), "--logs",
                    str(training / "logs.pb"), "--model-dir", str(model_dir), "--no-progress"],
                   check=True, capture_output=True)
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trained", action="store_true",
                        help="start both runs from models trained on another seed, so the learned kinds fire")
    args = parser.parse_args()
    # with trained models, 2 % of the requests are also N+1 or 20x slow (trace_outlier, slow_stage)
    outliers = {"outlier_rate": 0.02} if args.trained else {}
    bodies = [r.SerializeToString() for r in scenario_requests(args.traces, fault_rate=0.1, **outliers)]
    kill_after = set(random.Random(args.seed).sample(range(len(bodies) - 1), args.kills))
    with tempfile.TemporaryDirectory() as tmp:
        serve_args, env = ARGS, ENV
        if args.trained:
            serve_args = (*ARGS, "--model-dir", str(train(Path(tmp), args.traces)))
            # refits every 100 normal traces of a root operation: what the forest learns between
            # snapshots changes what it finds later, so losing it across a kill would show
            env = {**ENV, "TRACEGUARD_LEARNED__FOREST__REFIT_EVERY": "100"}
        reference, _ = run(bodies, Path(tmp) / "uninterrupted", set(), serve_args, env)
        killed, replayed = run(bodies, Path(tmp) / "killed", kill_after, serve_args, env)

    def split(found: dict) -> dict[str, set[str]]:
        groups: dict[str, set[str]] = {"structural": set(), "learned": set(), "stage_level": set()}
        for id_, (kind, trace_id) in found.items():
            groups["stage_level" if not trace_id else "structural" if kind in STRUCTURAL else "learned"].add(id_)
        return groups

    ref, got = split(reference), split(killed)
    report = {"benchmark": "serve_kill9", "traces": args.traces, "requests": len(bodies),
              "kills_after_request": sorted(kill_after), "requests_replayed_from_the_log": replayed}
    for group in ref:
        report[group] = {"uninterrupted": len(ref[group]), "killed": len(got[group]),
                         "missing": len(ref[group] - got[group]), "extra": len(got[group] - ref[group]),
                         "equal": ref[group] == got[group]}
    report["kinds_uninterrupted"] = dict(Counter(kind for kind, _ in reference.values()))
    report["kinds_killed"] = dict(Counter(kind for kind, _ in killed.values()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
