"""Detection quality against the scenario generator's labels.

Each label names the span a finding must be about: the missing root or parent
for ``missing_root``/``missing_parent`` (the span that never arrived), the
span itself for the other kinds. A finding matches a label of its kind,
trace and span; precision and recall are per kind.

Run ``python -m benchmarks.quality --traces 10000``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.scenario import ScenarioConfig, write_scenario
from traceguard.config import PipelineConfig
from traceguard.records import Anomaly
from traceguard.replay import run_replay
from traceguard.sinks import MemorySink

STRUCTURAL_KINDS = (
    "missing_parent", "missing_root", "unfinished_span",
    "context_outlived_parent", "late_span", "unpaired_client_span",
)


def subject(anomaly: Anomaly) -> tuple[str, str | None, str | None]:
    """(kind, trace, span) that a label of the same kind would name."""
    evidence = anomaly.evidence
    span = evidence.get("missing_root_span_id") or evidence.get("missing_parent_span_id") or anomaly.span_id
    return anomaly.kind.value, anomaly.trace_id, span


def score(anomalies: list[Anomaly], labels: list[dict], kinds=STRUCTURAL_KINDS) -> dict[str, dict]:
    found = {subject(a) for a in anomalies}
    truth = {(label["kind"], label["trace_id"], label["span_id"]) for label in labels}
    table = {}
    for kind in kinds:
        f = {x for x in found if x[0] == kind}
        t = {x for x in truth if x[0] == kind}
        hits = len(f & t)
        table[kind] = {
            "labels": len(t), "findings": len(f), "true_positives": hits,
            "precision": round(hits / len(f), 4) if f else (1.0 if not t else 0.0),
            "recall": round(hits / len(t), 4) if t else 1.0,
        }
    return table


def evaluate(directory: Path, config: PipelineConfig | None = None) -> tuple[dict[str, dict], dict]:
    sink = MemorySink()
    started = time.perf_counter()
    result = run_replay([directory / "traces.jsonl"], [directory / "logs.jsonl"], config or PipelineConfig(), [sink])
    elapsed = time.perf_counter() - started
    labels = [json.loads(line) for line in (directory / "labels.jsonl").read_text().splitlines()]
    linked = sum(1 for a in sink.anomalies if a.logs)
    extra = {"replay_seconds": round(elapsed, 2), "anomalies": len(sink.anomalies),
             "anomalies_with_logs": linked, "metrics": result.metrics.snapshot()}
    return score(sink.anomalies, labels), extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", type=Path, help="reuse a generated scenario instead of generating one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        generated = None
        if args.dir is None:
            generated = write_scenario(directory, ScenarioConfig(traces=args.traces, seed=args.seed))
        table, extra = evaluate(directory)
    print(json.dumps({
        "traces": args.traces, "seed": args.seed,
        "spans": generated.spans if generated else None,
        "decoys_and_drops": generated.counts if generated else None,
        "per_kind": table, **{k: v for k, v in extra.items() if k != "metrics"},
    }, indent=2))


if __name__ == "__main__":
    main()
