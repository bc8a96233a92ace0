"""Detection on real traces: the shared Nezha OnlineBoutique data set, scored by its own scorer.

Replays the fault day and, separately, the fault-free reference minute with
the default configuration (the same ``traceguard replay`` a user runs, cold:
no model directory), then runs the data set's ``score.py`` over the findings
and prints its figures as JSON, with the incidents and the replay times. The
detector knows nothing of this data set: nothing here is tuned to it.

    .venv/bin/python -m benchmarks.real_onlineboutique [--data DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "nezha-onlineboutique"


def replay(traces: Path, out: Path, incidents: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "traceguard", "replay", str(traces), "--out", str(out),
         "--incidents-out", str(incidents), "--no-progress"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"replay of {traces} failed ({result.returncode}): {result.stderr[-2000:]}")
    states: dict[str, dict] = {}
    for line in incidents.read_text().splitlines():
        record = json.loads(line)
        states[record["id"]] = record
    findings = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "findings": len(findings),
        "findings_by_kind": _count(f["kind"] for f in findings),
        "incidents": len(states),
        "incidents_list": [
            {"onset": i["onset"], "state": i["state"], "culprit": f"{i['service']} {i['operation']}",
             "signal": i["culprits"][0]["signal"], "explained": sum(i["attached"].values())}
            for i in sorted(states.values(), key=lambda i: i["onset"])
        ],
        "summary": result.stderr.splitlines()[0] if result.stderr else "",
    }


def incident_figures(incidents: list[dict], labels: list[dict], window_s: float = 180.0) -> dict:
    """One incident per fault? Per fault with data after injection: the incidents
    whose onset lies in [inject, inject + window] and whether the first of them
    names the injected service first; incidents whose onset lies in the data
    before an injection (nominally fault-free) are false."""
    window = int(window_s * 1e9)
    per_fault, false = [], []
    for fault in labels:
        if not fault.get("data_after_injection_s"):
            continue
        inject = fault["inject_time"]
        opened = sorted((i for i in incidents if inject <= i["onset"] <= inject + window), key=lambda i: i["onset"])
        per_fault.append({"id": fault["id"], "service": fault["service"], "type": fault["type"],
                          "incidents": len(opened),
                          "first_culprit": opened[0]["culprit"] if opened else None,
                          "culprit_right": bool(opened) and opened[0]["culprit"].split(" ")[0] == fault["service"]})
        for start, end in fault.get("data_intervals", []):
            false += [i for i in incidents if start <= i["onset"] < min(end, inject)]
    observable = len(per_fault)
    return {
        "observable_faults": observable,
        "faults_with_an_incident": sum(1 for f in per_fault if f["incidents"]),
        "faults_whose_first_incident_names_the_service": sum(1 for f in per_fault if f["culprit_right"]),
        "incidents_per_fault_with_one": round(sum(f["incidents"] for f in per_fault)
                                             / max(1, sum(1 for f in per_fault if f["incidents"])), 2),
        "false_incidents_before_injection": len({i["onset"] for i in false}),
        "per_fault": per_fault,
    }


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the data set's folder (with score.py)")
    parser.add_argument("--keep", type=Path, help="write the findings and incidents here instead of a temporary folder")
    args = parser.parse_args()
    faults = sorted(args.data.glob("faults-*.traces.jsonl.gz"))
    references = sorted(args.data.glob("reference-*.traces.jsonl.gz"))
    if not faults or not references or not (args.data / "score.py").exists():
        raise SystemExit(f"{args.data}: no faults-*/reference-* traces or score.py there")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = {}
        for name, files in (("faults", faults), ("reference", references)):
            runs[name] = replay(files[0], work / f"findings-{name}.jsonl", work / f"incidents-{name}.jsonl")
        scored = work / "score.json"
        score = subprocess.run(
            [sys.executable, str(args.data / "score.py"), str(work / "findings-faults.jsonl"),
             "--reference", str(work / "findings-reference.jsonl"), "--json", str(scored), "--cache", ""],
            capture_output=True, text=True, check=False,
        )
        if score.returncode != 0:
            raise SystemExit(f"score.py failed: {score.stderr[-2000:]}")
        labels = json.loads((args.data / "labels.json").read_text())
        labels = labels if isinstance(labels, list) else labels.get("faults", [])
        print(json.dumps({"benchmark": "real_onlineboutique", "replays": runs,
                          "incidents": incident_figures(runs["faults"]["incidents_list"], labels),
                          "score": json.loads(scored.read_text()), "score_text": score.stdout.splitlines()},
                         indent=1))


if __name__ == "__main__":
    main()
