"""The live receiver under load: a client process drives ``traceguard serve`` over OTLP/gRPC.

The server is a separate process (``traceguard serve``, all detectors on,
decision wait 2 s); this process sends the scenario's traffic as
pre-serialized 512-span ``ExportTraceServiceRequest`` bodies, back to back on
``--streams`` concurrent callers, and measures:

* sustained spans/s (spans acknowledged / wall time of the sending phase);
* client-observed export latency, p50 and p99;
* decision → stored latency of findings, and the decision lag (how long a
  due trace waited for its decision), from the server's histograms;
* server peak RSS (VmHWM);
* nothing lost: spans the server counted received == spans sent, none refused;
* the ceiling: ``ExportTraceServiceRequest.FromString`` of the same bodies here.

``--refit-every N`` makes the forests refit every N normal traces (5,000 by
default): a refit takes 150-200 ms, so this shows what refits do to export
latency and decision lag. ``--rate SPANS_PER_S`` sends at that steady rate
instead of as fast as the server answers: below capacity, the decision lag
is what stalls the deciding (not a backlog).

``--wal-cost R`` instead measures what the write-ahead log costs: R rounds,
each a run with ``serve.wal`` off and one with it on (``--fsync``: with
``serve.wal_fsync``), and the median sustained rate of each.

Run ``python -m benchmarks.serve_throughput [--traces N] [--streams S] [--refit-every N] [--rate R]
[--wal-cost R]``;
prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from benchmarks.common import median_rate, scenario_requests, send_back_to_back
from benchmarks.serve_process import ServeProcess, metric_total

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _histogram_quantile(text: str, name: str, q: float) -> float | None:
    buckets = [(float("inf") if b == "+Inf" else float(b), float(c))
               for b, c in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+-]+)$', text, re.M)]
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    return next(bound for bound, count in buckets if count >= target)


def measure(bodies: list[bytes], spans: list[int], streams: int, env: dict[str, str], every: float = 0.0) -> dict:
    """One run of a fresh server under the load."""
    total = sum(spans)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServeProcess(Path(tmp) / "state", "--decision-wait", "2s", "--max-trace-age", "10s",
                              env={"TRACEGUARD_SERVE__TICK": "100ms", **env})
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc}")
            export = channel.unary_unary(METHOD, request_serializer=None,
                                         response_deserializer=ExportTraceServiceResponse.FromString)
            export(bodies[0], timeout=30)  # warm the connection (its spans count as sent)
            started = time.perf_counter()
            latencies, errors = send_back_to_back(export, bodies[1:], streams, every)
            elapsed = time.perf_counter() - started
            sent_timed = total - spans[0]
            # findings of the decided traces are stored within decision wait + a tick
            server.wait_for(lambda: server.metric("traceguard_finding_store_seconds_count") > 0, timeout=60,
                            what="stored findings")
            time.sleep(12)  # let max_trace_age pass so the rootless traces are decided and stored too
            metrics = server.client.get("/metrics").text
            rss_kib = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{server.process.pid}/status").read_text())[1])
            channel.close()
        finally:
            exit_code = server.stop()
    latencies.sort()
    return {"rate": sent_timed / elapsed, "latencies": latencies, "errors": errors, "metrics": metrics,
            "rss_kib": rss_kib, "exit_code": exit_code, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--wal-cost", type=int, metavar="ROUNDS", help="compare serve.wal off and on")
    parser.add_argument("--fsync", action="store_true", help="with --wal-cost: serve.wal_fsync on")
    parser.add_argument("--refit-every", type=int, help="learned.forest.refit_every (default 5000)")
    parser.add_argument("--rate", type=float, help="send at this many spans per second (default: back to back)")
    args = parser.parse_args()
    refits = {"TRACEGUARD_LEARNED__FOREST__REFIT_EVERY": str(args.refit_every)} if args.refit_every else {}

    bodies = [r.SerializeToString() for r in scenario_requests(args.traces)]
    spans = [sum(len(ss.spans) for rs in ExportTraceServiceRequest.FromString(b).resource_spans
                 for ss in rs.scope_spans) for b in bodies]
    total = sum(spans)
    if args.wal_cost:
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.wal_cost):
            for wal in ("off", "on"):
                result = measure(bodies, spans, args.streams, {"TRACEGUARD_SERVE__WAL": str(wal == "on").lower(),
                                                               "TRACEGUARD_SERVE__WAL_FSYNC": str(args.fsync).lower()})
                rates[wal].append(round(result["rate"]))
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(json.dumps({"benchmark": "serve_throughput_wal_cost", "fsync": args.fsync, "transport": "grpc",
                          "streams": args.streams,
                          "requests": len(bodies), "spans": total, "sustained_spans_per_s": rates,
                          "median_off": round(off), "median_on": round(on), "cost": round(1 - on / off, 4),
                          "target_cost": 0.15}, indent=2))
        return

    def parse_only() -> int:
        for body in bodies:
            ExportTraceServiceRequest.FromString(body)
        return total

    ceiling = median_rate(parse_only, 5)[0]
    every = sum(spans) / len(spans) / args.rate if args.rate else 0.0
    result = measure(bodies, spans, args.streams, refits, every)
    metrics, latencies = result["metrics"], result["latencies"]
    received = metric_total(metrics, "traceguard_spans_received_total")
    refused = metric_total(metrics, "traceguard_requests_refused_total")
    stored_count = metric_total(metrics, "traceguard_finding_store_seconds_count")
    stored_sum = metric_total(metrics, "traceguard_finding_store_seconds_sum")
    store_p99 = _histogram_quantile(metrics, "traceguard_finding_store_seconds", 0.99)
    lag_p50 = _histogram_quantile(metrics, "traceguard_decision_lag_seconds", 0.5)
    lag_p99 = _histogram_quantile(metrics, "traceguard_decision_lag_seconds", 0.99)
    lag_max = _histogram_quantile(metrics, "traceguard_decision_lag_seconds", 1.0)
    ceiling = statistics.mean([ceiling, median_rate(parse_only, 5)[0]])  # before and after the load
    rate = result["rate"]
    print(json.dumps({
        "benchmark": "serve_throughput",
        "transport": "grpc", "streams": args.streams, "requests": len(bodies), "spans": total,
        "ceiling_parse_spans_per_s": round(ceiling),
        "sustained_spans_per_s": round(rate),
        "ratio": round(rate / ceiling, 4), "target_ratio": 0.08,
        "refit_every": args.refit_every or 5000, "paced_spans_per_s": args.rate,
        "export_latency_ms": {"p50": round(statistics.median(latencies) * 1e3, 2),
                              "p99": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 2),
                              "max": round(latencies[-1] * 1e3, 2), "target_p99": 50},
        "decision_to_stored_ms": {"mean": round(stored_sum / stored_count * 1e3, 2) if stored_count else None,
                                  "p99_bucket_upper_bound": store_p99 * 1e3 if store_p99 else None,
                                  "findings": int(stored_count), "target": 100},
        "decision_lag_ms_bucket_upper_bound": {"p50": lag_p50 * 1e3 if lag_p50 else None,
                                               "p99": lag_p99 * 1e3 if lag_p99 else None,
                                               "max": lag_max * 1e3 if lag_max else None},
        "lost": {"spans_received_by_server": int(received), "spans_sent": total, "refused_requests": int(refused),
                 "client_errors": result["errors"]},
        "server_peak_rss_mib": round(result["rss_kib"] / 1024, 1),
        "server_exit_code": result["exit_code"],
    }, indent=2))


if __name__ == "__main__":
    main()
