"""Shared by the benchmarks: scenario traffic packed into 512-span requests, medians, findings files."""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from benchmarks.scenario import ScenarioConfig, generate
from traceguard.records import Anomaly

REQUEST_SPANS = 512


def scenario_requests(traces: int, seed: int = 7, request_spans: int = REQUEST_SPANS, fault_rate: float | None = None,
                      logs: list | None = None, **config):
    """The generator's spans in export order, re-packed into requests of ``request_spans``
    spans (as a busy SDK or Collector batches them); ``fault_rate``: the generator's default
    if None; ``logs``: where the log export requests go, as the SDK exports them (dropped
    if None); ``config``: other ``ScenarioConfig`` fields."""
    pending: list = []
    requests = []

    def collect(_service, spans):
        pending.extend(spans)
        while len(pending) >= request_spans:
            requests.append(encode_spans(pending[:request_spans]))
            del pending[:request_spans]

    faults = {} if fault_rate is None else {"fault_rate": fault_rate}
    collect_logs = (lambda _service, records: logs.append(encode_logs(records))) if logs is not None else (lambda *_: None)
    generate(ScenarioConfig(traces=traces, seed=seed, duration_s=traces / 3, **faults, **config), collect, collect_logs)
    if pending:
        requests.append(encode_spans(pending))
    return requests


def median_rate(work: Callable[[], int], repeats: int) -> tuple[float, list[float]]:
    """Items per second of ``work`` (which returns how many items it did), median of repeats."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        items = work()
        rates.append(items / (time.perf_counter() - started))
    return statistics.median(rates), rates


def send_back_to_back(export, bodies: list[bytes], streams: int, every: float = 0.0) -> tuple[list[float], list[str]]:
    """Sends ``bodies`` back to back on ``streams`` concurrent callers of a gRPC
    ``export`` callable (``every`` > 0: request i not before i x ``every`` seconds,
    a steady rate instead of as fast as the server answers); returns each call's
    latency (seconds) and the error codes."""
    import grpc

    latencies: list[float] = []
    errors: list[str] = []
    queue = list(enumerate(bodies))
    lock = threading.Lock()
    began = time.perf_counter()

    def caller() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index, body = queue.pop(0)
            wait = began + index * every - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            started = time.perf_counter()
            try:
                export(body, timeout=60)
            except grpc.RpcError as error:
                errors.append(str(error.code()))
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=caller) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors


def last_versions(path: Path) -> dict[str, Anomaly]:
    """A JSONL findings file by finding id, the last version of each (a stage-level
    finding is written again at every state change)."""
    findings = {}
    for line in path.read_text().splitlines():
        anomaly = Anomaly.model_validate_json(line)
        findings[anomaly.id] = anomaly
    return findings


def last_incidents(stores: list[Path]) -> dict[str, dict]:
    """Each incident's last version (by ``updated_at``) over these state directories' SQLite
    stores, with ``member``: the index of the store it came from (a group's judges and
    their successors each keep the incidents they wrote)."""
    incidents: dict[str, dict] = {}
    for member, store in enumerate(stores):
        with sqlite3.connect(store / "anomalies.sqlite") as db:
            for (body,) in db.execute("SELECT body FROM incidents"):
                incident = {**json.loads(body), "member": member}
                if incident["updated_at"] >= incidents.get(incident["id"], incident)["updated_at"]:
                    incidents[incident["id"]] = incident
    return incidents
