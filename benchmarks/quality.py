"""Detection quality against the scenario generator's labels.

Trace-level labels name the span a finding must be about: the missing root or
parent for ``missing_root``/``missing_parent`` (the span that never arrived),
the span itself for the other structural kinds; ``missing_expected_span`` and
``trace_outlier`` labels name the trace only. A latency or error regression label names
a stage and its onset: a finding for that stage whose onset lies between two
minutes before the label's onset and its end is a hit, detected after
``detected_at - onset``; any other regression finding is a false alarm.

Run ``python -m benchmarks.quality --traces 10000`` (structural scenario) or
``python -m benchmarks.quality --latency`` (4 h with latency faults); prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.scenario import ScenarioConfig, latency_scenario, write_scenario
from traceguard.config import PipelineConfig
from traceguard.records import Anomaly
from traceguard.replay import run_replay
from traceguard.sinks import MemorySink

STRUCTURAL_KINDS = (
    "missing_parent", "missing_root", "unfinished_span",
    "context_outlived_parent", "late_span", "unpaired_client_span",
)
TRACE_KINDS = ("missing_expected_span", "trace_outlier", "log_anomaly")
ONSET_SLACK_NS = 120 * 10**9


def subject(anomaly: Anomaly) -> tuple[str, str | None, str | None]:
    """(kind, trace, span) that a label of the same kind would name."""
    if anomaly.kind.value in TRACE_KINDS:
        return anomaly.kind.value, anomaly.trace_id, None
    evidence = anomaly.evidence
    span = evidence.get("missing_root_span_id") or evidence.get("missing_parent_span_id") or anomaly.span_id
    return anomaly.kind.value, anomaly.trace_id, span


def _ratio(hits: int, total: int, empty: float) -> float:
    return round(hits / total, 4) if total else empty


def score(anomalies: list[Anomaly], labels: list[dict], kinds=STRUCTURAL_KINDS + TRACE_KINDS) -> dict[str, dict]:
    """Per-trace findings against per-trace labels. Stage-level findings of these
    kinds (a stage's routine pattern, a change of its rate) are not per-trace
    findings and are counted apart (``stage_level``)."""
    found = {subject(a) for a in anomalies if a.trace_id is not None}
    truth = {(label["kind"], label["trace_id"], label["span_id"]) for label in labels if label["trace_id"]}
    table = {}
    for kind in kinds:
        f = {x for x in found if x[0] == kind}
        t = {x for x in truth if x[0] == kind}
        hits = len(f & t)
        table[kind] = {"labels": len(t), "findings": len(f), "true_positives": hits,
                       "precision": _ratio(hits, len(f), 1.0 if not t else 0.0), "recall": _ratio(hits, len(t), 1.0)}
    return table


def _stage_level(anomalies: list[Anomaly]) -> dict[str, int]:
    """Stage-level findings by kind and state (an id written again counts once)."""
    latest = {a.id: a for a in anomalies if a.trace_id is None}
    counts: dict[str, int] = {}
    for a in latest.values():
        key = f"{a.kind.value}/{a.evidence.get('state', '')}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def score_regressions(anomalies: list[Anomaly], labels: list[dict], kind: str = "latency_regression") -> dict:
    """Per labelled regression of ``kind``: found or not, and the delay; plus false alarms."""
    wanted = [label for label in labels if label["kind"] == kind]
    opened = {a.id: a for a in anomalies if a.kind.value == kind and a.evidence["state"] == "open"}
    resolved = {a.id for a in anomalies if a.kind.value == kind and a.evidence["state"] == "resolved"}
    matched: set[str] = set()
    rows = []
    for label in wanted:
        hits = sorted(
            (a for a in opened.values()
             if (a.service, a.operation) == (label["service"], label["operation"])
             and label["onset"] - ONSET_SLACK_NS <= a.evidence["onset_unix_nano"] <= label["end"]),
            key=lambda a: a.detected_at,
        )
        matched.update(a.id for a in hits)
        first = hits[0] if hits else None
        rows.append({
            "fault": label["fault"], "stage": f"{label['service']} '{label['operation']}'",
            "found": first is not None,
            "delay_s": round((first.detected_at - label["onset"]) / 1e9, 1) if first else None,
            "onset_error_s": round((first.evidence["onset_unix_nano"] - label["onset"]) / 1e9, 1) if first else None,
            "magnitude": first.evidence["magnitude"] if first else None,
            "resolved": bool(first and first.id in resolved),
        })
    first_onset = min((label["onset"] for label in wanted), default=None)
    false = [a for a in opened.values() if a.id not in matched]
    return {
        "labels": len(wanted), "found": sum(r["found"] for r in rows),
        "recall": _ratio(sum(r["found"] for r in rows), len(wanted), 1.0),
        "false_alarms": len(false),
        "false_alarms_before_first_fault": sum(1 for a in false if first_onset and a.evidence["onset_unix_nano"] < first_onset),
        "false_alarm_stages": sorted({f"{a.service} '{a.operation}'" for a in false}),
        "per_label": rows,
    }


def slow_stage_summary(anomalies: list[Anomaly], labels: list[dict]) -> dict:
    outlier_traces = {label["trace_id"] for label in labels if label["kind"] == "trace_outlier"}
    slow = [a for a in anomalies if a.kind.value == "slow_stage"]
    return {"findings": len(slow), "in_labelled_outlier_traces": sum(a.trace_id in outlier_traces for a in slow)}


def every_finding(config: PipelineConfig | None = None) -> PipelineConfig:
    """``config`` with every per-trace finding emitted, also those an incident
    explains (they carry its id): per-trace detection is scored on its own,
    apart from how many of them an incident pages."""
    config = config or PipelineConfig()
    return config.model_copy(update={"incidents": config.incidents.model_copy(update={"exemplar_findings": 10**9})})


def evaluate(directory: Path, config: PipelineConfig | None = None) -> dict:
    sink = MemorySink()
    started = time.perf_counter()
    result = run_replay([directory / "traces.jsonl"], [directory / "logs.jsonl"], every_finding(config), [sink])
    elapsed = time.perf_counter() - started
    labels = [json.loads(line) for line in (directory / "labels.jsonl").read_text().splitlines()]
    return {
        "per_kind": score(sink.anomalies, labels),
        "latency_regression": score_regressions(sink.anomalies, labels),
        "error_regression": score_regressions(sink.anomalies, labels, "error_regression"),
        "slow_stage": slow_stage_summary(sink.anomalies, labels),
        "replay_seconds": round(elapsed, 2),
        "anomalies": len(sink.anomalies),
        "anomalies_with_logs": sum(1 for a in sink.anomalies if a.logs),
        "incidents": len({i.id for i in sink.incidents}),
        "stage_level": _stage_level(sink.anomalies),
        "metrics": result.metrics.snapshot(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--latency", action="store_true", help="the latency scenario (4 h, latency faults, outliers)")
    parser.add_argument("--dir", type=Path, help="reuse a generated scenario instead of generating one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        generated = None
        if args.dir is None:
            config = latency_scenario(seed=args.seed) if args.latency else ScenarioConfig(traces=args.traces, seed=args.seed)
            generated = write_scenario(directory, config)
        report = evaluate(directory)
    report.pop("metrics")
    print(json.dumps({
        "scenario": "latency" if args.latency else "structural", "seed": args.seed,
        "traces": generated.traces if generated else None, "spans": generated.spans if generated else None,
        "decoys_and_drops": generated.counts if generated else None, **report,
    }, indent=2))


if __name__ == "__main__":
    main()
