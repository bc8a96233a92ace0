"""The load cases of hostile input against a real ``traceguard serve``: memory stays bounded.

Each attack of the hostile-input issue, at the size it was reported with,
against one ``serve`` process with the default limits. After each: the
process is up, ``/healthz`` answers 200, and its resident memory (VmRSS, and
the peak VmHWM) is read. The bound stated is ``--rss-bound-mib`` (default
600 MiB: the idle receiver's ~185 MiB, plus ``serve.max_receiving_bytes``
(256 MiB) of request bodies in arrival, plus what the in-flight bounds hold);
the run fails if any reading passes it or ``/healthz`` does not answer.

Attacks:

* one error CLIENT span carrying 150,000 copies of a kept attribute (3.7 MB, under
  ``serve.max_request_bytes``), 40 times;
* 30 requests of 1,000 spans, each span with a new name (the stage cache);
* 450 connections that announce a 4 MiB body and stall before its end;
* as many idle connections as this process may open (past ``serve.max_connections``,
  1024; the client's own descriptor limit caps it, and is raised to its hard limit);
* 16 clients sending random bytes as protobuf and as JSON, 50 requests each.

Run ``python -m benchmarks.hostile_load [--rss-bound-mib N]``; prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.serve_process import ServeProcess
from traceguard.records import KIND_CLIENT

PROTOBUF = {"content-type": "application/x-protobuf"}


def _request(spans: list[dict]) -> ExportTraceServiceRequest:
    """One resource of one service; each dict: trace, span, name, attributes, error."""
    request = ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    service = resource.resource.attributes.add()
    service.key, service.value.string_value = "service.name", "attacker"
    scope = resource.scope_spans.add()
    for fields in spans:
        span = scope.spans.add(trace_id=fields["trace"].to_bytes(16, "big"), span_id=fields["span"].to_bytes(8, "big"),
                               parent_span_id=(999_999).to_bytes(8, "big"), name=fields["name"], kind=KIND_CLIENT,
                               start_time_unix_nano=1, end_time_unix_nano=2)
        if fields.get("error"):
            span.status.code = 2
        for key, value in fields.get("attributes", ()):
            attribute = span.attributes.add()
            attribute.key, attribute.value.string_value = key, value
    return request


def _memory(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: round(int(re.search(rf"{key}:\s+(\d+)", status)[1]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def _post(server: ServeProcess, body: bytes, headers: dict | None = None) -> int:
    return httpx.post(f"http://127.0.0.1:{server.http}/v1/traces", content=body, headers=headers or PROTOBUF,
                      timeout=120).status_code


def repeated_attribute(server: ServeProcess) -> dict:
    request = _request([{"trace": 1, "span": 1, "name": "q", "error": True,
                         "attributes": [("db.system", "postgresql")] * 150_000}])
    span = request.resource_spans[0].scope_spans[0].spans[0]
    codes = []
    for n in range(40):
        span.trace_id = (1000 + n).to_bytes(16, "big")
        codes.append(_post(server, request.SerializeToString()))
    return {"answers": sorted(set(codes))}


def new_stage_names(server: ServeProcess) -> dict:
    codes = []
    for n in range(30):
        request = _request([{"trace": 10_000 + n, "span": s + 1, "name": f"op-{n}-{s}-" + "x" * 200,
                             "attributes": [("db.system", "redis"), ("peer.service", "y" * 200)]}
                            for s in range(1000)])
        codes.append(_post(server, request.SerializeToString()))
    return {"answers": sorted(set(codes))}


def _connect(server: ServeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http), timeout=60)


def stalled_uploads(server: ServeProcess, count: int = 450) -> dict:
    sockets = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            sock = _connect(server)
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n"
                         b"content-length: 4194304\r\n\r\n" + b"\0" * 4_000_000)
            sockets.append(sock)
    held = _memory(server.process.pid)
    for sock in sockets:
        sock.close()
    return {"opened": len(sockets), "while_held": held}


def idle_connections(server: ServeProcess, count: int = 15_000) -> dict:
    sockets = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            sockets.append(_connect(server))
    health = server.client.get("/healthz").status_code
    for sock in sockets:
        sock.close()
    return {"opened": len(sockets), "healthz_while_held": health}


def random_bytes(server: ServeProcess, clients: int = 16, each: int = 50) -> dict:
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(each):
            body = rng.randbytes(rng.randrange(1, 200_000))
            headers = PROTOBUF if n % 2 else {"content-type": "application/json"}
            code = _post(server, body, headers)
            with lock:
                codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"answers": codes}


ATTACKS = (repeated_attribute, new_stage_names, stalled_uploads, idle_connections, random_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rss-bound-mib", type=float, default=600)
    args = parser.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = {"benchmark": "hostile_load", "rss_bound_mib": args.rss_bound_mib, "attacks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServeProcess(Path(tmp) / "state", "--decision-wait", "2s", "--max-trace-age", "4s")
        try:
            report["at_start"] = _memory(server.process.pid)
            for attack in ATTACKS:
                started = time.monotonic()
                result = attack(server)
                result["seconds"] = round(time.monotonic() - started, 1)
                result["alive"] = server.process.poll() is None
                result["healthz"] = server.client.get("/healthz").status_code if result["alive"] else None
                result["memory_after"] = _memory(server.process.pid) if result["alive"] else None
                report["attacks"][attack.__name__] = result
            metrics = server.client.get("/metrics").text
            report["refused"] = {m[0]: float(m[1]) for m in re.findall(
                r"^(traceguard_(?:requests_refused|connections_refused|connections_timed_out)_total\{[^}]*\}) (\S+)$",
                metrics, re.M)}
        finally:
            report["exit_code"] = server.stop(timeout=120)
    peak = max(r["memory_after"]["VmHWM"] for r in report["attacks"].values() if r["memory_after"])
    report["peak_rss_mib"] = peak
    report["within_bound"] = peak <= args.rss_bound_mib and all(
        r["alive"] and r["healthz"] == 200 for r in report["attacks"].values())
    print(json.dumps(report, indent=2))
    os._exit(0 if report["within_bound"] else 1)


if __name__ == "__main__":
    main()
