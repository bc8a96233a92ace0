"""Runs ``traceguard serve`` as a real process on free ports (integration tests, serve benchmark)."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time

import httpx

LISTENING = re.compile(r"listening: OTLP/gRPC :(\d+), OTLP/HTTP :(\d+), API :(\d+)")


def metric_total(text: str, name: str) -> float:
    """A metric's value in Prometheus text, summed over its series."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


class ServeProcess:
    def __init__(self, state_dir, *args: str, env: dict[str, str] | None = None) -> None:
        environ = {**os.environ, "TRACEGUARD_SERVE__TICK": "50ms", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "traceguard", "serve", "--grpc-listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--state-dir", str(state_dir), *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environ,
        )
        self.lines: list[str] = []
        ports = threading.Event()

        def drain() -> None:
            for line in self.process.stderr:
                self.lines.append(line)
                match = LISTENING.search(line)
                if match:
                    self.grpc, self.http, self.api = map(int, match.groups())
                    ports.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ports.wait(60):
            self.process.kill()
            raise RuntimeError("serve did not start:\n" + "".join(self.lines))
        # the API takes the receivers' token and TLS
        token, cert = environ.get("TRACEGUARD_SERVE__TOKEN"), environ.get("TRACEGUARD_SERVE__TLS_CERT")
        self.client = httpx.Client(
            base_url=f"{'https' if cert else 'http'}://127.0.0.1:{self.api}", timeout=10,
            headers={"authorization": f"Bearer {token}"} if token else None,
            verify=ssl.create_default_context(cafile=cert) if cert else True)

    def anomalies(self, **filters) -> list[dict]:
        """Every stored finding, following the cursor."""
        items, cursor = [], None
        while True:
            params = {**filters, "limit": 200, **({"cursor": cursor} if cursor else {})}
            page = self.client.get("/api/anomalies", params=params).raise_for_status().json()
            items += page["items"]
            cursor = page["next"]
            if cursor is None:
                return items

    def metric(self, name: str) -> float:
        """A metric's value from /metrics, summed over its series."""
        return metric_total(self.client.get("/metrics").text, name)

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition"):
        """Polls ``predicate()`` until it returns something truthy (no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, timeout: float = 30.0) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def exporters(transport: str, server: ServeProcess):
    """The OpenTelemetry SDK's OTLP span and log exporters (``grpc`` or ``http``), aimed at ``server``."""
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = f"127.0.0.1:{server.grpc}"
        return OTLPSpanExporter(endpoint=endpoint, insecure=True), OTLPLogExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    base = f"http://127.0.0.1:{server.http}"
    return OTLPSpanExporter(endpoint=f"{base}/v1/traces"), OTLPLogExporter(endpoint=f"{base}/v1/logs")


def send_balanced(servers: list[ServeProcess], config) -> list[dict]:
    """The scenario ``config`` generates, through the SDK's OTLP/gRPC exporters, each span
    and log record to the instance its trace id picks (``trace_id % len(servers)``), as the
    Collector's load-balancing exporter routes; returns the labels."""
    from benchmarks.scenario import generate

    pairs = [exporters("grpc", server) for server in servers]
    results = []

    def route(batch, trace_id, signal):
        shares = [[] for _ in servers]
        for item in batch:
            shares[trace_id(item) % len(servers)].append(item)
        results.extend(pairs[i][signal].export(share) for i, share in enumerate(shares) if share)

    generated = generate(config, lambda _, batch: route(batch, lambda span: span.context.trace_id, 0),
                         lambda _, batch: route(batch, lambda record: record.log_record.trace_id, 1))
    for spans, logs in pairs:
        spans.shutdown()
        logs.shutdown()
    failed = [r for r in results if r.name != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} exports failed")
    return [label.__dict__ for label in generated.labels]
