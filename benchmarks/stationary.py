"""False alarms on healthy traffic: the generator with no fault for two hours.

Heavy-tailed latency, per-service clock skew, cache misses and retries as
the generator makes them, and nothing injected. Prints, as JSON, the incidents
and the findings of every kind per trace (the budget is learned.alert_rate).

    .venv/bin/python -m benchmarks.stationary [--hours 2] [--seed 7] [--pods 1]

``--pods N``: every service runs as N replicas behind a load balancer (each call
lands on one), so the per-pod latency windows are judged too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.quality import evaluate
from benchmarks.scenario import ScenarioConfig, write_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--traces-per-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pods", type=int, default=1)
    args = parser.parse_args()
    config = ScenarioConfig(traces=int(args.hours * 3600 * args.traces_per_s), seed=args.seed,
                            duration_s=args.hours * 3600, fault_rate=0.0, pods=args.pods)
    with tempfile.TemporaryDirectory() as tmp:
        write_scenario(Path(tmp), config)
        result = evaluate(Path(tmp))
    by_kind: dict[str, int] = {}
    for labels, count in result["metrics"].get("traceguard_anomalies_total", {}).items():
        kind = dict(part.split("=", 1) for part in labels.split(","))["kind"]
        by_kind[kind] = by_kind.get(kind, 0) + count
    print(json.dumps({"benchmark": "stationary", "hours": args.hours, "seed": args.seed, "pods": args.pods,
                      "traces": config.traces,
                      "incidents": result["incidents"], "findings_by_kind": dict(sorted(by_kind.items())),
                      "findings_per_trace": {k: round(n / config.traces, 6) for k, n in sorted(by_kind.items())}}))


if __name__ == "__main__":
    main()
