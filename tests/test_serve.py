"""``traceguard serve`` as a real process, fed by the OpenTelemetry SDK's real OTLP exporters."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import ssl
import subprocess

import grpc
import httpx
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from benchmarks.quality import score
from benchmarks.scenario import LIVE_FAULTS, ScenarioConfig, generate
from builders import logs_request, sid, tid, traces_request
from benchmarks.serve_process import ServeProcess, exporters

LIVE_KINDS = ("missing_parent", "missing_root", "unfinished_span", "context_outlived_parent",
              "unpaired_client_span", "missing_expected_span")
FAST = ("--decision-wait", "2s", "--max-trace-age", "4s")


def send_scenario(server: ServeProcess, transport: str, traces: int = 1500):
    spans, logs = exporters(transport, server)
    results = []
    generated = generate(
        ScenarioConfig(traces=traces, seed=5, duration_s=traces * 0.6, fault_rate=0.2, cooldown_s=30,
                       faults=LIVE_FAULTS),
        lambda _, batch: results.append(spans.export(batch)),
        lambda _, batch: results.append(logs.export(batch)),
    )
    spans.shutdown()
    logs.shutdown()
    assert all(r.name == "SUCCESS" for r in results)
    return generated


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_findings_from_sdk_exporters_match_the_labels(tmp_path, transport):
    # Every per-trace finding is stored, also those an incident explains: what is
    # checked is detection through the live path, not how many an incident pages.
    # A trace's spans come in several exports; on a loaded machine two exports can be
    # seconds apart, so the decision waits long enough not to split a trace.
    server = ServeProcess(tmp_path / "state", "--decision-wait", "10s", "--max-trace-age", "20s",
                          env={"TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": "1000000000"})
    try:
        generated = send_scenario(server, transport)
        labels = [label.__dict__ for label in generated.labels]
        expected = sum(1 for label in labels if label["kind"] in LIVE_KINDS)

        def settled():
            found = server.anomalies()
            table = score([_anomaly(a) for a in found], labels, LIVE_KINDS)
            return table if sum(row["true_positives"] for row in table.values()) >= expected else None

        table = server.wait_for(settled, timeout=180, what="every labelled finding")
        for kind in LIVE_KINDS:
            assert table[kind]["labels"] >= 3, (kind, table[kind])
            assert table[kind]["precision"] >= 0.99 and table[kind]["recall"] >= 0.99, (kind, table[kind])
        one = server.anomalies(kind="missing_root")[0]
        detail = server.client.get(f"/api/anomalies/{one['id']}").raise_for_status().json()
        assert detail["id"] == one["id"] and detail["logs"], "findings carry their trace's logs"
        metrics = server.client.get("/metrics").text
        assert f'traceguard_spans_received_total{{transport="{transport}"}}' in metrics
        assert "traceguard_anomalies_total" in metrics
    finally:
        assert server.stop() == 0


def _anomaly(item: dict):
    from traceguard.records import Anomaly

    return Anomaly.model_validate(item)


def test_restart_keeps_findings_and_learned_state(tmp_path):
    state = tmp_path / "state"
    server = ServeProcess(state, *FAST)
    try:
        send_scenario(server, "grpc")
        server.wait_for(lambda: server.anomalies(kind="missing_root") and server.anomalies(kind="missing_parent"),
                        what="decided traces")
    finally:
        assert server.stop() == 0  # SIGTERM: decides what is in flight, saves, exits 0
    assert (state / "models" / "manifest.json").exists()
    again = ServeProcess(state, *FAST)
    try:
        stored = again.anomalies()
        assert stored and {a["kind"] for a in stored} >= {"missing_root", "missing_parent"}
        assert any("learned state loaded" in line for line in again.lines)
    finally:
        assert again.stop() == 0


@pytest.fixture
def server(tmp_path):
    process = ServeProcess(tmp_path / "state", *FAST, env={"TRACEGUARD_ASSEMBLER__MAX_SPANS_IN_FLIGHT": "1000",
                                                            "TRACEGUARD_SERVE__MAX_REQUEST_BYTES": "200000"})
    yield process
    assert process.stop() == 0


def _orphans(trace: int, count: int):
    """Spans of one trace under a parent that never comes: they stay in flight until max age."""
    return traces_request(*[dict(trace_id=tid(trace), span_id=sid(n + 1), parent_span_id=sid(999_999), name="w",
                                 start_time_unix_nano=1, end_time_unix_nano=2) for n in range(count)])


def test_http_answers_bad_bodies_as_otlp_says(server):
    url = f"http://127.0.0.1:{server.http}"
    protobuf = {"content-type": "application/x-protobuf"}
    assert httpx.post(f"{url}/v1/traces", content=b"\xff\x01garbage", headers=protobuf).status_code == 400
    assert httpx.post(f"{url}/v1/traces", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(f"{url}/v1/traces", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert httpx.post(f"{url}/v1/traces", content=b"\0" * 300_000, headers=protobuf).status_code == 413
    bomb = gzip.compress(b"\0" * 5_000_000)
    assert httpx.post(f"{url}/v1/traces", content=bomb, headers={**protobuf, "content-encoding": "gzip"}).status_code == 413
    good = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "ok", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
    bad = dict(good, spanId="0102")
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [good, bad]}]}]})
    answer = httpx.post(f"{url}/v1/traces", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200
    assert answer.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert "spanId must be 8 bytes" in answer.json()["partialSuccess"]["errorMessage"]
    gzipped = gzip.compress(_orphans(7, 3).SerializeToString())
    assert httpx.post(f"{url}/v1/traces", content=gzipped, headers={**protobuf, "content-encoding": "gzip"}).status_code == 200
    # the process is still serving after all that
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").status_code == 200


def test_grpc_partial_success_for_wrong_ids(server):
    request = traces_request(dict(trace_id=b"\x01" * 8, span_id=sid(1)), dict(trace_id=tid(3), span_id=sid(2)))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        response = trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)
    assert response.partial_success.rejected_spans == 1
    assert "trace_id must be 16" in response.partial_success.error_message


def test_grpc_answers_an_undecodable_body_invalid_argument(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as error:
            export(b"\xff\x01garbage", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an OTLP traces protobuf message" in error.value.details()
    assert server.client.get("/healthz").status_code == 200


def test_overload_pushes_back_and_nothing_accepted_is_lost(server):
    url = f"http://127.0.0.1:{server.http}/v1/traces"
    protobuf = {"content-type": "application/x-protobuf"}
    for trace in (1, 2):
        assert httpx.post(url, content=_orphans(trace, 450).SerializeToString(), headers=protobuf).status_code == 200
    refused = httpx.post(url, content=_orphans(3, 450).SerializeToString(), headers=protobuf)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(_orphans(4, 450), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = RetryInfo.FromString(dict(error.value.trailing_metadata())["google.rpc.retryinfo-bin"])
    assert retry.retry_delay.seconds == 1
    # the two accepted traces are decided at max age, every span of them counted
    found = server.wait_for(lambda: (lambda items: items if len(items) == 2 else None)(
        server.anomalies(kind="missing_root")), what="both accepted traces")
    assert sorted(a["trace_id"] for a in found) == [tid(1).hex(), tid(2).hex()]
    assert all(a["evidence"]["span_count"] == 450 for a in found)
    metrics = server.client.get("/metrics").text
    assert 'traceguard_requests_refused_total{reason="overloaded",signal="traces",transport="http"} 1.0' in metrics
    assert 'traceguard_requests_refused_total{reason="overloaded",signal="traces",transport="grpc"} 1.0' in metrics


def _rss_kib(pid: int) -> int:
    import re
    from pathlib import Path

    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])


def test_memory_stays_bounded_while_refusing(tmp_path):
    # nothing is decided during the test (10 min), so the bound stays reached
    server = ServeProcess(tmp_path / "state", "--decision-wait", "10m", "--max-trace-age", "10m",
                          env={"TRACEGUARD_ASSEMBLER__MAX_SPANS_IN_FLIGHT": "1000"})
    try:
        _refuse_many(server)
    finally:
        assert server.stop() == 0


def _refuse_many(server):
    url = f"http://127.0.0.1:{server.http}/v1/traces"
    protobuf = {"content-type": "application/x-protobuf"}
    assert httpx.post(url, content=_orphans(30, 900).SerializeToString(), headers=protobuf).status_code == 200
    body = _orphans(31, 450).SerializeToString()
    for _ in range(20):  # warm up allocator and code paths
        assert httpx.post(url, content=body, headers=protobuf).status_code == 429
    before = _rss_kib(server.process.pid)
    with httpx.Client() as client:
        codes = {client.post(url, content=body, headers=protobuf).status_code for _ in range(400)}
    assert codes == {429}
    grown_mib = (_rss_kib(server.process.pid) - before) / 1024
    assert grown_mib < 8, f"RSS grew {grown_mib:.1f} MiB while refusing 400 requests of 450 spans"


def test_a_span_after_its_trace_was_decided_is_a_late_span(server):
    url = f"http://127.0.0.1:{server.http}/v1/traces"
    protobuf = {"content-type": "application/x-protobuf"}
    root = traces_request(dict(trace_id=tid(40), span_id=sid(1), name="GET /", kind=2,
                               start_time_unix_nano=1, end_time_unix_nano=9))
    assert httpx.post(url, content=root.SerializeToString(), headers=protobuf).status_code == 200
    server.wait_for(lambda: 'traceguard_traces_decided_total{reason="quiet"} 1.0' in server.client.get("/metrics").text,
                    what="the decision")
    late = traces_request(dict(trace_id=tid(40), span_id=sid(2), parent_span_id=sid(1), name="cleanup",
                               start_time_unix_nano=2, end_time_unix_nano=3))
    assert httpx.post(url, content=late.SerializeToString(), headers=protobuf).status_code == 200
    (finding,) = server.wait_for(lambda: server.anomalies(kind="late_span"), what="the late span")
    assert (finding["trace_id"], finding["span_id"]) == (tid(40).hex(), sid(2).hex())


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_span_events_are_the_logs_of_the_findings_on_their_trace(server, transport):
    """An SDK that logs through span events (and records exceptions as events)
    exports no OTLP logs: the events are the logs its findings carry."""
    from opentelemetry import trace as trace_api
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    spans, _ = exporters(transport, server)
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")
    parent = tracer.start_span("POST /checkout", kind=trace_api.SpanKind.SERVER)  # never ended: never exported
    with tracer.start_as_current_span("charge card", context=trace_api.set_span_in_context(parent)) as child:
        child.add_event("log", {"log.message": "retrying charge", "log.severity": "WARN"})
        try:
            raise ValueError("card declined")
        except ValueError as exc:
            child.record_exception(exc)
    provider.shutdown()
    trace_id = f"{child.get_span_context().trace_id:032x}"
    span_id = f"{child.get_span_context().span_id:016x}"

    def finding():
        return [a for a in server.anomalies(kind="missing_root") if a["trace_id"] == trace_id]

    found = server.wait_for(finding, timeout=120, what="the orphan's finding")[0]
    logs = server.client.get(f"/api/anomalies/{found['id']}").raise_for_status().json()["logs"]
    assert sorted((log["span_id"], log["service"], log["severity_text"], log["body"].splitlines()[0])
                  for log in logs) == [(span_id, "shop", "ERROR", "ValueError: card declined"),
                                       (span_id, "shop", "WARN", "retrying charge")]
    assert any("Traceback" in log["body"] for log in logs), "the stack trace comes with the exception"
    assert "traceguard_span_events_total 2" in server.client.get("/metrics").text


def test_a_log_that_arrives_after_the_finding_is_attached(server):
    url = f"http://127.0.0.1:{server.http}"
    protobuf = {"content-type": "application/x-protobuf"}
    assert httpx.post(f"{url}/v1/traces", content=_orphans(5, 2).SerializeToString(), headers=protobuf).status_code == 200
    (finding,) = server.wait_for(lambda: server.anomalies(trace_id=tid(5).hex()), what="the finding")
    assert finding["logs"] == []
    late_log = logs_request(dict(trace_id=tid(5), span_id=sid(1), time_unix_nano=3, severity_number=17,
                                 severity_text="ERROR", body="pool exhausted"))
    assert httpx.post(f"{url}/v1/logs", content=late_log.SerializeToString(), headers=protobuf).status_code == 200
    updated = server.wait_for(
        lambda: server.client.get(f"/api/anomalies/{finding['id']}").json()["logs"], what="the late log")
    assert [log["body"] for log in updated] == ["pool exhausted"]


def _self_signed(directory):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_and_bearer_token_on_both_protocols(tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ServeProcess(tmp_path / "state", *FAST, env={
        "TRACEGUARD_SERVE__TOKEN": "s3cret", "TRACEGUARD_SERVE__TLS_CERT": str(cert),
        "TRACEGUARD_SERVE__TLS_KEY": str(key)})
    try:
        body = _orphans(8, 2).SerializeToString()
        url = f"https://127.0.0.1:{server.http}/v1/traces"
        headers = {"content-type": "application/x-protobuf"}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.post(url, content=body, headers=headers).status_code == 401
            ok = client.post(url, content=body, headers={**headers, "authorization": "Bearer s3cret"})
            assert ok.status_code == 200
        # plain HTTP gets no answer: refused, closed or reset, as the TLS stack meets it
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
            httpx.post(url.replace("https", "http"), content=body, headers=headers, timeout=5)
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{server.grpc}", credentials,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Export(_orphans(9, 1), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stub.Export(_orphans(9, 1), metadata=(("authorization", "Bearer s3cret"),), timeout=10)
        found = server.wait_for(lambda: (lambda items: items if len(items) == 2 else None)(
            server.anomalies(kind="missing_root")), what="the two authorised traces")
        assert sorted(a["trace_id"] for a in found) == [tid(8).hex(), tid(9).hex()]
        # the API: the same TLS and token; health and readiness open for probes
        api = f"https://127.0.0.1:{server.api}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get(f"{api}/api/anomalies").status_code == 401
            assert client.get(f"{api}/metrics").status_code == 401
            assert client.get(f"{api}/healthz").status_code == 200 and client.get(f"{api}/readyz").status_code == 200
        metrics = server.client.get("/metrics").text
        assert 'traceguard_requests_refused_total{reason="unauthenticated",signal="traces",transport="grpc"} 1.0' in metrics
        assert 'traceguard_requests_refused_total{reason="unauthenticated",signal="traces",transport="http"} 1.0' in metrics
    finally:
        assert server.stop() == 0


def test_forwarding_to_a_second_traceguard(tmp_path):
    upstream = ServeProcess(tmp_path / "upstream", *FAST)
    sidecar = ServeProcess(tmp_path / "sidecar", *FAST, "--forward-to", f"127.0.0.1:{upstream.grpc}")
    try:
        protobuf = {"content-type": "application/x-protobuf"}
        url = f"http://127.0.0.1:{sidecar.http}/v1/traces"
        assert httpx.post(url, content=_orphans(11, 3).SerializeToString(), headers=protobuf).status_code == 200
        span = {"traceId": tid(12).hex(), "spanId": sid(1).hex(), "parentSpanId": sid(5).hex(), "name": "j",
                "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
        body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]})
        assert httpx.post(url, content=body, headers={"content-type": "application/json"}).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc}") as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(_orphans(13, 2), timeout=10)
        wanted = sorted(tid(n).hex() for n in (11, 12, 13))
        for server in (sidecar, upstream):
            found = server.wait_for(lambda: (lambda items: items if len(items) == 3 else None)(
                server.anomalies(kind="missing_root")), what="all three traces")
            assert sorted(a["trace_id"] for a in found) == wanted
        assert 'traceguard_forwarded_total{signal="traces"} 3.0' in sidecar.client.get("/metrics").text
    finally:
        assert sidecar.stop() == 0 and upstream.stop() == 0


def test_a_dead_upstream_costs_nothing_but_a_counted_failure(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    sidecar = ServeProcess(tmp_path / "sidecar", *FAST, "--forward-to", f"127.0.0.1:{dead}")
    try:
        url = f"http://127.0.0.1:{sidecar.http}/v1/traces"
        answer = httpx.post(url, content=_orphans(14, 2).SerializeToString(),
                            headers={"content-type": "application/x-protobuf"})
        assert answer.status_code == 200
        sidecar.wait_for(lambda: sidecar.anomalies(kind="missing_root"), what="detection despite the dead upstream")
        sidecar.wait_for(lambda: 'traceguard_forward_failures_total{signal="traces"} 1.0'
                         in sidecar.client.get("/metrics").text, what="the counted failure")
    finally:
        assert sidecar.stop() == 0


def test_sigterm_decides_what_is_in_flight_and_a_trained_model_dir_is_a_starting_point(tmp_path, scenario):
    import subprocess
    import sys

    models = tmp_path / "trained"
    trained = subprocess.run([sys.executable, "-m", "traceguard", "train", str(scenario / "traces.jsonl"),
                              "--model-dir", str(models)], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    state = tmp_path / "state"
    jsonl = tmp_path / "findings.jsonl"
    server = ServeProcess(state, "--decision-wait", "10m", "--max-trace-age", "10m", "--model-dir", str(models),
                          env={"TRACEGUARD_SERVE__JSONL_OUT": str(jsonl)})
    try:
        assert any(f"learned state loaded from {models}" in line for line in server.lines)
        url = f"http://127.0.0.1:{server.http}/v1/traces"
        assert httpx.post(url, content=_orphans(21, 3).SerializeToString(),
                          headers={"content-type": "application/x-protobuf"}).status_code == 200
        assert server.anomalies() == []  # nothing is due for ten minutes
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(a["kind"], a["trace_id"], a["evidence"]["decision"]) for a in lines] == [
        ("missing_root", tid(21).hex(), "flush")]
    again = ServeProcess(state, *FAST)
    try:
        assert [a["trace_id"] for a in again.anomalies()] == [tid(21).hex()]
        assert any(f"learned state loaded from {state / 'models'}" in line for line in again.lines)
    finally:
        assert again.stop() == 0


def test_after_stop_no_thread_it_started_is_alive(tmp_path):
    import threading
    import time

    from traceguard.config import load_config
    from traceguard.serve import Server

    before = {thread.ident for thread in threading.enumerate()}
    config = load_config(None, {"serve.grpc_listen": "127.0.0.1:0", "serve.http_listen": "127.0.0.1:0",
                                "serve.api_listen": "127.0.0.1:0", "serve.state_dir": str(tmp_path),
                                "serve.forward_to": "127.0.0.1:9"}, environ={})
    server = Server(config)
    server.start()
    server.stop()
    server.stop()  # idempotent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not alive:
            break
        time.sleep(0.05)
    assert alive == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs (needs the right to mount, as root has on CI's machines)."""
    path = tmp_path / "fs"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(path) -> int:
    """Writes zeros into ``path`` until the filesystem is full; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                written += filler.write(b"\0" * 65536)
                filler.flush()
    return written


def test_a_full_disk_refuses_exports_then_recovers_and_nothing_accepted_is_lost(small_filesystem):
    """A real full filesystem under the state directory (write-ahead log, store, models):
    exports are refused (429 / 503 with Retry-After), ``/readyz`` says not ready, the
    process stays up; once space returns it is ready again and every trace it
    acknowledged, before or during the outage, has its finding in the store."""
    server = ServeProcess(small_filesystem / "state", *FAST)
    url = f"http://127.0.0.1:{server.http}/v1/traces"
    protobuf = {"content-type": "application/x-protobuf"}
    try:
        assert httpx.post(url, content=_orphans(1, 3).SerializeToString(), headers=protobuf).status_code == 200
        server.wait_for(lambda: server.anomalies(kind="missing_root"), what="the first trace's finding")
        assert _fill(small_filesystem / "filler") > 0
        accepted, refused = [1], []
        for trace in range(2, 400):  # until the log or the store can no longer write
            answer = httpx.post(url, content=_orphans(trace, 3).SerializeToString(), headers=protobuf)
            if answer.status_code == 200:
                accepted.append(trace)
                continue
            assert answer.status_code in (429, 503) and answer.headers["retry-after"] == "1", answer.text
            refused.append(trace)
            if server.client.get("/readyz").status_code == 503:
                break
        assert refused and server.client.get("/readyz").status_code == 503
        assert server.client.get("/healthz").status_code == 200
        (small_filesystem / "filler").unlink()
        server.wait_for(lambda: server.client.get("/readyz").status_code == 200, timeout=120, what="ready again")
        for trace in refused:  # the client's retry
            assert httpx.post(url, content=_orphans(trace, 3).SerializeToString(), headers=protobuf).status_code == 200
        wanted = {tid(n).hex() for n in accepted + refused}
        found = server.wait_for(lambda: (lambda ids: ids if ids >= wanted else None)(
            {a["trace_id"] for a in server.anomalies(kind="missing_root")}), timeout=120, what="every trace's finding")
        assert found == wanted
        metrics = server.client.get("/metrics").text
        assert re.search(r'traceguard_requests_refused_total\{reason="(wal_full|store_failing)"', metrics)
    finally:
        assert server.stop() == 0
