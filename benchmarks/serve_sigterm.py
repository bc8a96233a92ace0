"""SIGTERM of ``serve`` with a million spans in flight: it exits within ``serve.shutdown_timeout``.

A real ``serve`` process with the write-ahead log (``--state-dir``) is sent
about a million spans over OTLP/HTTP (protobuf, 1,000 spans a request, 100
spans a trace, or ``--spans-per-trace``) with a decision wait long enough that none is decided, so all
of them are in flight. Then SIGTERM: the time to exit and the exit code are
read, and how many traces the shutdown left undecided (it decides until
three quarters of ``shutdown_timeout`` are gone, then leaves the rest to the
log). A second ``serve`` on the same state directory then replays the log:
the time until it listens, and the spans it holds in flight again (the
undecided ones: none lost).

The bound the Kubernetes manifests grant is 30 s (``terminationGracePeriodSeconds``);
``shutdown_timeout`` is 10 s by default.

Run ``python -m benchmarks.serve_sigterm [--spans N]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.serve_process import ServeProcess
from traceguard.records import KIND_INTERNAL, KIND_SERVER

SPANS_PER_REQUEST = 1_000
NOW_NS = time.time_ns()
ENV = {"TRACEGUARD_ASSEMBLER__DECISION_WAIT": "1h", "TRACEGUARD_ASSEMBLER__MAX_TRACE_AGE": "2h"}


def request(first_trace: int, spans_per_trace: int) -> bytes:
    """SPANS_PER_REQUEST spans: whole traces of a root and its children, timed now."""
    message = ExportTraceServiceRequest()
    resource = message.resource_spans.add()
    kv = resource.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "api"
    spans = resource.scope_spans.add().spans
    for t in range(SPANS_PER_REQUEST // spans_per_trace):
        trace_id = (first_trace + t + 1).to_bytes(16, "big")
        for s in range(spans_per_trace):
            spans.add(trace_id=trace_id, span_id=(s + 1).to_bytes(8, "big"),
                      parent_span_id=b"" if s == 0 else (1).to_bytes(8, "big"), name="GET /x" if s == 0 else f"step {s % 7}",
                      kind=KIND_SERVER if s == 0 else KIND_INTERNAL,
                      start_time_unix_nano=NOW_NS + s * 1000, end_time_unix_nano=NOW_NS + 10**6 + s * 1000)
    return message.SerializeToString()


def metric(server: ServeProcess, name: str) -> float:
    text = server.client.get("/metrics").text
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--spans-per-trace", type=int, default=100, choices=(4, 8, 10, 20, 100, 1000))
    args = parser.parse_args()
    per_trace = args.spans_per_trace
    requests = args.spans // SPANS_PER_REQUEST
    with tempfile.TemporaryDirectory() as state:
        server = ServeProcess(state, env=ENV)
        url = f"http://127.0.0.1:{server.http}/v1/traces"
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda n: client.post(url, content=request(n * SPANS_PER_REQUEST // per_trace, per_trace),
                                                        headers={"content-type": "application/x-protobuf"}).status_code,
                                  range(requests)))
        accepted = sum(SPANS_PER_REQUEST for c in codes if c == 200)
        server.wait_for(lambda: metric(server, "traceguard_spans_accepted_total") >= accepted,
                        timeout=600, what="every accepted span in the assembler")
        in_flight = metric(server, "traceguard_spans_in_flight")
        server.client.close()
        started = time.monotonic()
        server.process.send_signal(15)
        code = server.process.wait(600)
        exit_seconds = time.monotonic() - started
        log = "".join(server.lines)
        left = re.search(r"(\d+) traces in flight were not decided", log)
        print(log[-3000:], file=sys.stderr)
        started = time.monotonic()
        again = ServeProcess(state, env=ENV)
        ready_seconds = time.monotonic() - started
        replayed = metric(again, "traceguard_spans_in_flight")
        again.stop(600)
    print(json.dumps({
        "benchmark": "serve_sigterm", "spans_sent": requests * SPANS_PER_REQUEST, "spans_per_trace": per_trace,
        "answers": {str(c): codes.count(c) for c in sorted(set(codes))},
        "spans_in_flight_at_sigterm": in_flight, "shutdown_timeout_s": 10.0,
        "exit_code": code, "exit_seconds": round(exit_seconds, 2),
        "traces_left_to_the_log": int(left[1]) if left else 0,
        "restart_listening_seconds": round(ready_seconds, 2), "spans_in_flight_after_replay": replayed,
    }, indent=1))


if __name__ == "__main__":
    main()
