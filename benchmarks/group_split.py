"""What a consumer group of N members finds against what one consumer finds (issue 18's "split brain").

The latency scenario (two stationary hours, a 3x DB slowdown, a 1.5x one, a
slow leak and a burst of cache failures) is produced as the Collector's kafka
exporter writes it (one message per trace id, keyed by it) into topics of
``--partitions`` partitions, then read by a group of N ``traceguard consume``
members started together (event time, exit at end, each with its own state
directory), for each N of ``--members``. Per N:

* each labelled regression: the ``latency_regression`` / ``error_regression``
  findings that open on it (one consumer opens one), their onsets, and
  whether their ids are the single consumer's;
* incidents: how many, each with its first culprit and onset, and how many
  have the single consumer's id;
* the per-trace learned kinds, counted, against the single consumer's.

A size written ``jN`` runs N members with one judge (``--decided-topic``);
the first size is the baseline the others are compared with.

Run ``python -m benchmarks.group_split --bootstrap HOST:PORT [--members 1,2,3]
[--partitions 6] [--seed 7] [--rate 1.0]``; prints JSON. The broker:
``scripts/kafka start`` prints its address.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

from benchmarks.common import last_incidents, last_versions
from benchmarks.kafka_feed import create_topics, feed
from benchmarks.scenario import latency_scenario, write_scenario
from traceguard.records import Anomaly

ENV = {"TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": str(10**9)}
PER_TRACE_LEARNED = ("missing_expected_span", "slow_stage", "trace_outlier", "context_outlived_parent")
REGRESSIONS = ("latency_regression", "error_regression")


def run_group(bootstrap: str, scenario: Path, members: int, partitions: int, work: Path,
              judged: bool = False) -> tuple[list, list]:
    """The scenario through a group of ``members`` (``judged``: with one judge, through a decided
    topic): every finding (last version of each, all members) and every incident (last version
    of each, with the member whose store holds it)."""
    suffix = uuid.uuid4().hex[:8]
    traces, logs = f"spans_{suffix}", f"logs_{suffix}"
    create_topics(bootstrap, {traces: partitions, logs: partitions})
    feed(bootstrap, scenario, traces, logs)
    processes = []
    for member in range(members):
        args = [sys.executable, "-m", "traceguard", "consume", "--bootstrap-servers", bootstrap, "--group",
                f"g_{suffix}", "--traces-topic", traces, "--logs-topic", logs, "--time", "event",
                "--initial-offset", "earliest", "--exit-at-end", "--anomalies-topic", "",
                "--state-dir", str(work / f"member{member}"), "--out", str(work / f"member{member}.jsonl"),
                *(["--decided-topic", f"decided_{suffix}"] if judged else [])]
        processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, **ENV}))
    for process in processes:
        _, stderr = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise SystemExit(f"a member failed ({process.returncode}): {stderr[-3000:]}")
    findings: dict[str, Anomaly] = {}
    for member in range(members):
        findings.update(last_versions(work / f"member{member}.jsonl"))
    return list(findings.values()), list(last_incidents([work / f"member{m}" for m in range(members)]).values())


def regressions(findings: list[Anomaly], labels: list[dict], single: dict | None) -> list[dict]:
    """Per labelled regression: the findings of its kind (the last version of each, open or
    resolved) whose onset on its stage is in it (from two minutes before)."""
    rows = []
    for label in labels:
        if label["kind"] not in REGRESSIONS:
            continue
        opened = sorted((a for a in findings if a.kind.value == label["kind"]
                         and (a.service, a.operation) == (label["service"], label["operation"])
                         and label["onset"] - 120e9 <= a.evidence["onset_unix_nano"] <= label["end"]),
                        key=lambda a: a.evidence["onset_unix_nano"])
        ids = [a.id for a in opened]
        rows.append({
            "fault": label["fault"], "kind": label["kind"], "stage": f"{label['service']} '{label['operation']}'",
            "findings": len(opened),
            "onsets_s_after_fault": [round((a.evidence["onset_unix_nano"] - label["onset"]) / 1e9, 1) for a in opened],
            "ids": ids,
            "ids_of_the_single_consumer": (None if single is None else
                                           sum(i in single.get((label["fault"], label["kind"]), ()) for i in ids)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--members", default="1,2,3")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second of the 4 h scenario")
    parser.add_argument("--keep", type=Path, help="keep the scenario and each member's output here")
    args = parser.parse_args()
    sizes = [(int(n.lstrip("j")), n.startswith("j")) for n in args.members.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        scenario = Path(tmp) / "scenario"
        write_scenario(scenario, latency_scenario(traces_per_s=args.rate, seed=args.seed), proto=True)
        labels = [json.loads(line) for line in (scenario / "labels.jsonl").read_text().splitlines()]
        single = single_incidents = single_counts = None
        for n, judged in sizes:
            work = Path(tmp) / f"group{'j' if judged else ''}{n}"
            work.mkdir()
            findings, incidents = run_group(args.bootstrap, scenario, n, args.partitions, work, judged)
            rows = regressions(findings, labels, single)
            counts = Counter(a.kind.value for a in findings if a.kind.value in PER_TRACE_LEARNED and a.trace_id)
            if single is None:
                single = {(r["fault"], r["kind"]): set(r["ids"]) for r in rows}
                single_incidents, single_counts = {i["id"] for i in incidents}, counts
            results.append({
                "members": n,
                "judged": judged,
                "regressions": rows,
                "incidents": len(incidents),
                "incidents_with_the_single_consumer_id": sum(i["id"] in single_incidents for i in incidents),
                "incident_list": sorted(({"member": i["member"], "onset_unix_s": round(i["onset"] / 1e9, 1),
                                          "first_culprit": f"{i['culprits'][0]['service']} "
                                                           f"'{i['culprits'][0]['operation']}'" if i["culprits"] else None}
                                         for i in incidents), key=lambda i: i["onset_unix_s"]),
                "per_trace_learned": dict(sorted(counts.items())),
                "per_trace_learned_vs_single": {k: round(counts[k] / single_counts[k] - 1, 4) if single_counts[k] else None
                                                for k in PER_TRACE_LEARNED},
            })
    print(json.dumps({"benchmark": "group_split", "seed": args.seed, "rate": args.rate,
                      "partitions": args.partitions, "groups": results}, indent=1))


if __name__ == "__main__":
    main()
