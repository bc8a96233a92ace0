"""Load-balanced ``traceguard serve`` instances with and without one judge (issue 18).

N live ``serve`` processes get the live scenario through the OpenTelemetry
SDK's OTLP/gRPC exporters, each span and log record sent to the instance its
trace id picks, as the Collector's load-balancing exporter routes. Run once
with ``--decided-topic`` (one group through the broker: the instance that
holds the topic judges every trace) and once without (each instance learns
from its share). Per run: precision and recall per per-trace kind over the
findings of all instances, and per instance the traces it forwarded and
judged and the findings it holds.

Run ``python -m benchmarks.serve_group --bootstrap HOST:PORT [--instances 2]
[--traces 1500] [--seed 5]``; prints JSON. The broker: ``scripts/kafka start``
prints its address.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.quality import score
from benchmarks.scenario import LIVE_FAULTS, ScenarioConfig
from benchmarks.serve_process import ServeProcess, send_balanced
from traceguard.records import Anomaly

KINDS = ("missing_parent", "missing_root", "unfinished_span", "context_outlived_parent",
         "unpaired_client_span", "missing_expected_span")
GROUP_METRICS = ("traceguard_group_traces_forwarded_total", "traceguard_group_traces_judged_total",
                 "traceguard_group_traces_out_of_order_total", "traceguard_group_traces_judged_before_total")


def run(work: Path, instances: int, config: ScenarioConfig, bootstrap: str | None) -> dict:
    group = ()
    if bootstrap is not None:
        topic = f"decided_bench_{time.time_ns()}"
        group = ("--decided-topic", topic, "--bootstrap-servers", bootstrap, "--group", f"g_{topic}")
    servers = [ServeProcess(work / str(i), "--decision-wait", "10s", "--max-trace-age", "20s", *group,
                            env={"TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": "1000000000"}) for i in range(instances)]
    try:
        labels = send_balanced(servers, config)

        def settled():  # every decided trace judged (or, without a judge, decided) and stored
            if bootstrap is not None:
                judged = sum(s.metric("traceguard_group_traces_judged_total") for s in servers)
                forwarded = sum(s.metric("traceguard_group_traces_forwarded_total") for s in servers)
                return forwarded >= config.traces and judged == forwarded
            return sum(s.metric("traceguard_traces_decided_total") for s in servers) >= config.traces

        servers[0].wait_for(settled, timeout=600, what="every trace decided and judged")
        held = [[Anomaly.model_validate(a) for a in s.anomalies()] for s in servers]
        table = score([a for findings in held for a in findings], labels, KINDS)
        return {"kinds": {k: {x: table[k][x] for x in ("labels", "findings", "true_positives", "precision", "recall")}
                          for k in KINDS},
                "instances": [{"findings": len(findings), **{m: s.metric(m) for m in GROUP_METRICS}}
                              for s, findings in zip(servers, held)]}
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka broker HOST:PORT")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--traces", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    config = ScenarioConfig(traces=args.traces, seed=args.seed, duration_s=args.traces * 0.6, fault_rate=0.2,
                            cooldown_s=30, faults=LIVE_FAULTS)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"instances": args.instances, "traces": args.traces, "seed": args.seed,
               "judged": run(Path(tmp) / "judged", args.instances, config, args.bootstrap),
               "plain": run(Path(tmp) / "plain", args.instances, config, None)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
