"""The main job on the embedded default: a live sidecar fed by the real OpenTelemetry SDK.

Starts ``traceguard serve`` on free localhost ports with a fresh state
directory and sends the demo scenario through the SDK's OTLP/gRPC span and log
exporters, paced: its 15 minutes of traffic in about 36 s, with 3 s stage
windows and a 300-line log baseline per service, so that the fault in its
second half (a cache lookup failing half of its calls with a new exception)
becomes an incident while the demo runs.
Then it waits until every trace is decided, prints the stored findings as
JSONL on stdout and a summary (per kind, and the incidents) on stderr, and
stops the server with SIGTERM. Nothing external is needed. With ``--keep`` the
server keeps running afterwards with its web view (``http://127.0.0.1:PORT/``)
until Ctrl-C.

Run ``python -m benchmarks.demo_live [--traces N] [--keep]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

from benchmarks.scenario import LIVE_FAULTS, SECOND, ErrorFault, ScenarioConfig, generate
from benchmarks.serve_process import ServeProcess



PACE = 25  # event seconds sent per wall second
# stage windows short enough for a paced minute to hold a baseline, a fault and its incident
ENV = {"TRACEGUARD_ERRORS__WINDOW": "3s", "TRACEGUARD_LEARNED__LATENCY__WINDOW": "3s",
       "TRACEGUARD_LEARNED__TEMPLATES__WINDOW": "3s", "TRACEGUARD_LEARNED__TEMPLATES__MIN_LINES": "300",
       "TRACEGUARD_INCIDENTS__UPDATE_INTERVAL": "5s"}


class _Paced:
    """Holds each span batch until its time, PACE times faster than the traffic's own."""

    def __init__(self, start_ns: int) -> None:
        self.start, self.began = start_ns, time.monotonic()

    def wait(self, spans) -> None:
        at = max(span.end_time or span.start_time for span in spans)
        delay = (at - self.start) / SECOND / PACE - (time.monotonic() - self.began)
        if delay > 0:
            time.sleep(delay)


def _print(findings: list[dict], incidents: list[dict], generated) -> None:
    for finding in findings:
        print(json.dumps(finding))
    by_kind = collections.Counter(f["kind"] for f in findings)
    labels = collections.Counter(label.kind for label in generated.labels)
    print(f"traceguard serve (live demo): {len(findings)} findings", file=sys.stderr)
    for kind in sorted(set(by_kind) | set(labels)):
        print(f"  {kind:<26} {by_kind[kind]:>6}   (faults injected: {labels.get(kind, 0)})", file=sys.stderr)
    print(f"incidents: {len(incidents)}", file=sys.stderr)
    for incident in incidents:
        print(f"  {incident['state']:<9} {incident['summary']}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=1500)
    parser.add_argument("--keep", action="store_true", help="keep serving the web view until Ctrl-C")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        server = ServeProcess(Path(state), "--decision-wait", "2s", "--max-trace-age", "4s", env=ENV)
        try:
            print(f"traceguard serve: OTLP/gRPC 127.0.0.1:{server.grpc}, OTLP/HTTP 127.0.0.1:{server.http}, "
                  f"API http://127.0.0.1:{server.api}", file=sys.stderr)
            spans = OTLPSpanExporter(endpoint=f"127.0.0.1:{server.grpc}", insecure=True)
            logs = OTLPLogExporter(endpoint=f"127.0.0.1:{server.grpc}", insecure=True)
            duration = args.traces * 0.6
            config = ScenarioConfig(
                traces=args.traces, seed=11, duration_s=duration, fault_rate=0.15, cooldown_s=30, faults=LIVE_FAULTS,
                error_faults=(ErrorFault("catalog", "GET product:*", 0.5 * duration, 0.8 * duration, 0.5),))
            paced = _Paced(config.start_unix_s * SECOND)
            generated = generate(config, lambda _, batch: paced.wait(batch) or spans.export(batch),
                                 lambda _, batch: logs.export(batch))
            spans.shutdown()
            logs.shutdown()
            print(f"sent {generated.spans} spans and {generated.logs} log records of {generated.traces} requests "
                  "with the OpenTelemetry SDK; waiting for the decisions", file=sys.stderr)
            time.sleep(6)  # max trace age (4 s) + a tick: by then every trace is decided
            _print(server.anomalies(), server.client.get("/api/incidents").raise_for_status().json()["items"],
                   generated)
            if args.keep:
                sys.stdout.flush()
                print(f"the web view: http://127.0.0.1:{server.api}/ (Ctrl-C stops the server)", file=sys.stderr)
                with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop the server below
                    server.process.wait()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
