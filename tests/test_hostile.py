"""Hostile input and fail-closed settings, the fast cases (issue 15): each
answered with a clear error and the right status, the process unharmed."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from traceguard.api import create_api
from traceguard.auth import bearer_matches
from traceguard.config import ConfigError, PipelineConfig, load_config
from traceguard.metrics import Metrics, prometheus_text
from traceguard.sinks.sqlite import SqliteStore


@pytest.mark.parametrize("header, ok", [
    ("Bearer s3cret", True), ("bearer s3cret", True), ("BEARER  s3cret ", True),
    ("Bearer s3cre", False), ("Bearer s3cret2", False), ("Basic s3cret", False), ("s3cret", False),
    ("", False), (None, False), ("Bearer", False),
])
def test_bearer_scheme_is_case_insensitive_and_the_token_exact(header, ok):
    assert bearer_matches(header, "s3cret") is ok


@pytest.mark.parametrize("section", ["serve", "consume"])
@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_token_is_a_configuration_error_not_no_authentication(section, token):
    with pytest.raises(ConfigError, match=rf"{section}.*token is empty"):
        load_config(None, overrides={f"{section}.token": token}, environ={})


def test_an_empty_token_from_the_environment_is_refused_too(monkeypatch):
    monkeypatch.setenv("TRACEGUARD_SERVE__TOKEN", "")
    with pytest.raises(ConfigError, match="token is empty"):
        load_config(None)


@pytest.fixture
def api(tmp_path):
    store = SqliteStore(tmp_path / "anomalies.sqlite")
    metrics = Metrics()
    yield TestClient(create_api(store, metrics, lambda: True, token="s3cret")), metrics
    store.close()


def test_the_api_needs_the_token_except_for_health(api):
    client, metrics = api
    for path in ("/api/anomalies", "/api/incidents", "/metrics", "/openapi.json", "/api/traces/" + "a" * 32,
                 "/api/stages?service=s&operation=o"):
        answer = client.get(path)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", path
        assert client.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, headers={"authorization": "bearer s3cret"}).status_code in (200, 404), path
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    # the web view's page, script and style hold no data: the page asks for the token itself
    page = client.get("/")
    assert page.status_code == 200 and 'src="ui/app.js"' in page.text and "findings" not in page.text.lower()
    assert client.get("/ui/app.js").status_code == 200 and client.get("/ui/app.css").status_code == 200
    assert client.get("/ui/../api/anomalies").status_code in (401, 404)
    assert 'traceguard_api_refused_total{status="401"} 13.0' in prometheus_text(metrics).decode()


@pytest.mark.parametrize("params", [
    {"cursor": str(2**63)}, {"cursor": "9" * 40}, {"since": str(2**63)},
    {"since": "9999-12-31T23:59:59"}, {"since": "yesterday"},
])
def test_out_of_range_paging_is_a_bad_request(api, params):
    client, _ = api
    headers = {"authorization": "Bearer s3cret"}
    for path in ("/api/anomalies", "/api/incidents"):
        assert client.get(path, params=params, headers=headers).status_code in (400, 422), (path, params)


def test_the_largest_valid_values_still_answer(api):
    client, _ = api
    headers = {"authorization": "Bearer s3cret"}
    for path in ("/api/anomalies", "/api/incidents"):
        assert client.get(path, params={"cursor": "9" * 18, "since": str(2**63 - 1)},
                          headers=headers).json()["items"] == []


def test_defaults_need_no_token():
    assert PipelineConfig().serve.token is None and PipelineConfig().consume.token is None


@pytest.fixture
def receiver(tmp_path):
    """The OTLP/HTTP receiver in process, on a real pipeline and SQLite store, with a token."""
    from traceguard.assemble import WallClock
    from traceguard.pipeline import Pipeline
    from traceguard.sources.live import LiveIngest
    from traceguard.sources.otlp_http import create_otlp_http

    config = PipelineConfig()
    store = SqliteStore(tmp_path / "anomalies.sqlite")
    pipeline = Pipeline(config, WallClock(), [store])
    ingest = LiveIngest(pipeline, store, config)
    yield TestClient(create_otlp_http(ingest, max_request_bytes=1 << 16, token="s3cret", read_timeout_s=30,
                                      max_receiving_bytes=1 << 20)), pipeline.metrics, store
    store.close()


@pytest.mark.parametrize("signal", ["traces", "logs"])
@pytest.mark.parametrize("body", [b"[]", b"3", b'"x"', b"null", b"[{}]"])
def test_json_that_is_not_an_object_is_a_bad_request(receiver, signal, body):
    client, metrics, _ = receiver
    answer = client.post(f"/v1/{signal}", content=body,
                         headers={"content-type": "application/json", "authorization": "Bearer s3cret"})
    assert answer.status_code == 400 and "not an object" in answer.json()["message"]
    assert f'traceguard_requests_refused_total{{reason="undecodable",signal="{signal}",transport="http"}} 1.0' \
        in prometheus_text(metrics).decode()


def test_every_refusal_is_counted_by_reason(receiver):
    client, metrics, _ = receiver
    auth = {"authorization": "Bearer s3cret"}
    assert client.post("/v1/traces", content=b"{}", headers={"content-type": "application/json"}).status_code == 401
    assert client.post("/v1/traces", content=b"{}", headers={**auth, "content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/traces", content=b"x" * (1 << 17),
                       headers={**auth, "content-type": "application/x-protobuf"}).status_code == 413
    assert client.post("/v1/traces", content=b"\xff\xff",
                       headers={**auth, "content-type": "application/x-protobuf"}).status_code == 400
    text = prometheus_text(metrics).decode()
    for reason in ("unauthenticated", "unsupported", "too_large", "undecodable"):
        assert f'traceguard_requests_refused_total{{reason="{reason}",signal="traces",transport="http"}} 1.0' in text


# Model directories: a file that passes its checksum but holds hostile data (the
# manifest re-signed), and a save cut short.

def _resign(directory):
    import hashlib
    import json

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def model_dir(tmp_path):
    from test_learned import _trained

    _trained(tmp_path / "models")
    return tmp_path / "models"


def test_model_counts_that_are_not_finite_are_refused_at_load(model_dir):
    import numpy as np

    from traceguard.models import store

    with np.load(model_dir / "latency.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["self_counts"] = arrays["self_counts"].astype(float)
    arrays["self_counts"][0, 3] = np.nan
    np.savez_compressed(model_dir / "latency.npz", **arrays)
    _resign(model_dir)
    with pytest.raises(store.ModelFileError, match="not finite"):
        store.load(model_dir, PipelineConfig().learned)


@pytest.mark.parametrize("text", [
    '{"roots": [{"service": "a", "operation": "b", "traces": Infinity, "stages": []}]}',
    "[" * 100_000 + "]" * 100_000,
    '{"roots": [{"service": "a", "operation": "b", "traces": 1e400, "stages": []}]}',
])
def test_structure_json_out_of_bounds_is_refused_at_load(model_dir, text):
    from traceguard.models import store

    (model_dir / "structure.json").write_text(text)
    _resign(model_dir)
    with pytest.raises(store.ModelFileError, match="malformed model data"):
        store.load(model_dir, PipelineConfig().learned)


def test_a_forest_file_that_would_inflate_past_the_bound_is_refused_before_inflating(model_dir):
    import numpy as np

    from traceguard.models import store

    np.savez_compressed(model_dir / "forest.npz", meta=np.array("[]"), shared=np.zeros((3_000_000, 1)))
    assert (model_dir / "forest.npz").stat().st_size < 100_000  # 24 MB of zeros, compressed
    _resign(model_dir)
    small = PipelineConfig.model_validate({"learned": {"forest": {"max_root_operations": 1, "reservoir": 50}}}).learned
    with pytest.raises(store.ModelFileError, match="would inflate"):
        store.load(model_dir, small)


def test_a_save_cut_short_leaves_a_whole_model_directory(model_dir):
    """Killed between the two renames of the swap: the old directory is found;
    killed while writing the new one: the half-written staging is ignored."""
    import os

    from traceguard.models import store

    before = store.load(model_dir, PipelineConfig().learned)
    os.rename(model_dir, model_dir.with_name(".models.old"))  # the first rename done, not the second
    (model_dir.with_name(".models.new")).mkdir()
    (model_dir.with_name(".models.new") / "latency.npz").write_bytes(b"half")
    assert store.exists(model_dir)
    loaded = store.load(model_dir, PipelineConfig().learned)
    assert set(loaded.latency.stages_) == set(before.latency.stages_)
    store.save(loaded, model_dir)  # the next save completes the swap
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["models"]
    assert set(store.load(model_dir, PipelineConfig().learned).latency.stages_) == set(before.latency.stages_)


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_a_truncated_compressed_replay_file_replays_what_came_before_and_says_why(tmp_path, compress):
    import gzip
    import json

    import zstandard

    from builders import sid, tid
    from test_replay_cli import replay

    def line(n):
        span = {"traceId": tid(n).hex(), "spanId": sid(1).hex(), "parentSpanId": sid(9).hex(), "name": "op",
                "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
        return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}) + "\n"

    text = "".join(line(n) for n in range(1, 2001)).encode()
    packed = gzip.compress(text) if compress == "gzip" else zstandard.ZstdCompressor().compress(text)
    path = tmp_path / f"traces.jsonl.{'gz' if compress == 'gzip' else 'zst'}"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    result = replay(path, "--out", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    # gzip says the stream broke off; zstd's reader ends quietly, so the last line breaks off instead
    assert ("the compressed file is corrupt or truncated" if compress == "gzip" else "corrupt, skipped") \
        in result.stderr and "Traceback" not in result.stderr
    replayed = len((tmp_path / "out.jsonl").read_text().splitlines())
    assert 0 < replayed < 2000  # the traces before the break, each a missing_parent
    strict = replay(path, "--out", tmp_path / "out2.jsonl", "--strict", check=False)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr


@pytest.mark.parametrize("key, value, says", [
    ("serve.tick", "0s", "serve.tick"), ("serve.max_request_bytes", str(2**40), "serve.max_request_bytes"),
])
def test_settings_that_would_spin_or_overflow_are_refused(key, value, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, {key: value}, environ={})


def test_a_tls_key_that_does_not_fit_its_certificate_is_said_plainly(tmp_path):
    import os
    import subprocess
    import sys

    from test_serve import _self_signed

    cert, _ = _self_signed(tmp_path)
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    result = subprocess.run([sys.executable, "-m", "traceguard", "serve", "--state-dir", str(tmp_path / "s"),
                             "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
                            env={**os.environ, "TRACEGUARD_SERVE__TLS_CERT": str(cert),
                                 "TRACEGUARD_SERVE__TLS_KEY": str(bad_key)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "tls_cert and serve.tls_key cannot be used together" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("document", [b"[" * 60_000, b'{"data": [' + b"[" * 60_000, b"[" + b'{"a":' * 60_000])
def test_deeply_nested_jaeger_or_zipkin_is_corrupt_at_once_not_gigabytes(tmp_path, document):
    """60 KB of brackets took the streaming parser to 9 GB (a path per event, the square of the depth)."""
    import subprocess
    import sys

    path = tmp_path / "deep.json"
    path.write_bytes(document)
    # the peak of this process's own memory (VmHWM): ru_maxrss also counts the parent's peak
    # at the spawn, which for pytest late in the suite is past the bound by itself
    code = ("import re, sys; from traceguard.cli import main; status = main(['replay', sys.argv[1], "
            "'--out', '/dev/null']); status_file = open('/proc/self/status').read(); "
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', status_file)[1], file=sys.stderr); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert "nested deeper than 64 levels" in result.stderr, result.stderr
    assert result.returncode == 2 and "no span could be read from the input" in result.stderr  # nothing else in it
    assert int(result.stderr.strip().splitlines()[-1]) < 400_000  # KiB: start-up is 75-120 MB


def test_http_listeners_bound_connections_slow_headers_and_stalled_bodies(tmp_path):
    """A real serve: past max_connections a connection is closed at once; one that
    sends no request is closed after read_timeout; a body that stalls gets 408, and
    bodies in arrival past max_receiving_bytes get 503. /healthz answers throughout."""
    import contextlib
    import socket

    from benchmarks.serve_process import ServeProcess

    server = ServeProcess(tmp_path / "state", env={
        "TRACEGUARD_SERVE__MAX_CONNECTIONS": "8", "TRACEGUARD_SERVE__READ_TIMEOUT": "5s",
        "TRACEGUARD_SERVE__MAX_RECEIVING_BYTES": str(1 << 20)})

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.http), timeout=60)

    def closed(sock: socket.socket) -> bytes:
        """What the server sent before closing (waits for the close, up to the socket timeout)."""
        data = b""
        with contextlib.suppress(ConnectionResetError):  # an abort is a close too
            while chunk := sock.recv(65536):
                data += chunk
        return data

    def stalled_upload(sent: int) -> socket.socket:
        sock = connect()
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\n"
                     b"content-length: 4000000\r\n\r\n" + b"\0" * sent)
        return sock

    try:
        idle = [connect() for _ in range(8)]
        extra = connect()
        assert closed(extra) == b""  # past the cap: closed at once
        assert server.client.get("/healthz").status_code == 200
        for sock in idle:  # no request within read_timeout: closed
            assert closed(sock) == b""
        # two uploads would hold 1.2 MB of the 1 MiB budget: the one whose chunk crosses it is
        # refused (which one depends on how their chunks interleave), the other times out
        uploads = [stalled_upload(600_000), stalled_upload(600_000)]
        assert sorted(closed(sock)[:12] for sock in uploads) == [b"HTTP/1.1 408", b"HTTP/1.1 503"]
        metrics = server.client.get("/metrics").text
        assert 'traceguard_connections_refused_total{listener="otlp_http"}' in metrics
        assert 'reason="too_slow"' in metrics and 'reason="receiving_bound"' in metrics
        assert server.client.get("/healthz").status_code == 200
    finally:
        assert server.stop() == 0


def test_a_store_that_refuses_writes_holds_findings_in_order_and_writes_them_when_it_can(tmp_path):
    """Disk full (SQLite's page limit stands in for it): nothing is lost or raised,
    ``failing`` says why, and the backlog lands in order once writes work again."""
    from traceguard.records import Anomaly, AnomalyKind

    store = SqliteStore(tmp_path / "anomalies.sqlite")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")

    def finding(n: int) -> Anomaly:
        return Anomaly(id=f"{n:032x}", kind=AnomalyKind.MISSING_ROOT, trace_id=f"{n:032x}", span_id=None,
                       service="svc", operation="op", detected_at=n, event_time=n, severity="warning", score=0.5,
                       summary="x" * 2000, evidence={})

    for n in range(1, 201):
        store.emit(finding(n))
    assert store.failing is not None and "full" in store.failing
    store.flush()  # the transaction that filled the disk is held too
    assert 0 < store.backlog <= 200
    assert not store.retry()  # still full
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert store.retry() and store.failing is None and store.backlog == 0
    items, _ = store.query(limit=1000)
    assert [a.id for a in items] == [f"{n:032x}" for n in range(1, 201)]
    store.close()


def test_receivers_refuse_while_the_store_cannot_write(receiver):
    """Not 200 while findings cannot be stored: 429 (OTLP: retry later) with the reason, counted."""
    client, metrics, store = receiver
    store.failing = "database or disk is full"
    headers = {"content-type": "application/json", "authorization": "Bearer s3cret"}
    for signal in ("traces", "logs"):
        answer = client.post(f"/v1/{signal}", content=b"{}", headers=headers)
        assert answer.status_code == 429 and "cannot write" in answer.json()["message"]
        assert f'reason="store_failing",signal="{signal}"' in prometheus_text(metrics).decode()
    store.failing = None
    assert client.post("/v1/traces", content=b"{}", headers=headers).status_code == 200


def test_a_corrupt_findings_store_is_said_plainly_at_start(tmp_path):
    """(A read-only one takes the same path, a DatabaseError at open; root, which CI may
    run as, writes read-only files anyway, so that case has no test here.)"""
    import os
    import subprocess
    import sys

    state = tmp_path / "state"
    state.mkdir()
    (state / "anomalies.sqlite").write_bytes(b"this is not a database" * 100)
    result = subprocess.run([sys.executable, "-m", "traceguard", "serve", "--state-dir", str(state),
                             "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                             "--api-listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=120,
                            env=os.environ)
    assert result.returncode == 2 and "cannot be used" in result.stderr and "Traceback" not in result.stderr


def test_the_api_loads_nothing_from_a_cdn(api):
    client, _ = api
    assert client.get("/docs", headers={"authorization": "Bearer s3cret"}).status_code == 404
    assert client.get("/redoc", headers={"authorization": "Bearer s3cret"}).status_code == 404
    assert client.get("/openapi.json", headers={"authorization": "Bearer s3cret"}).json()["info"]["title"] == "traceguard"


def test_metrics_are_declared_once_exposed_with_help_and_zero_from_the_start():
    """Series of known label values exist before anything happened; HELP is a sentence,
    not the name; the process and build metrics are there; every metric name the
    code uses is declared; the README's table is the declarations'."""
    import re
    from pathlib import Path

    from traceguard.metrics import DECLARED, markdown_table

    text = prometheus_text(Metrics()).decode()
    assert 'traceguard_requests_refused_total{reason="overloaded",signal="traces",transport="http"} 0.0' in text
    assert 'traceguard_logs_evicted_total{reason="ttl"} 0.0' in text and "traceguard_spans_accepted_total 0.0" in text
    assert "# HELP traceguard_spans_accepted_total Spans taken into the assembler." in text
    from traceguard.assemble import EventTimeClock
    from traceguard.pipeline import Pipeline

    pipeline = Pipeline(PipelineConfig(), EventTimeClock(0), [])
    assert "# TYPE traceguard_latency_untracked_samples_total counter" in prometheus_text(pipeline.metrics).decode()
    assert re.search(r'traceguard_build_info\{python="[0-9.]+",version="[0-9.]+"\} 1\.0', text)
    assert "process_resident_memory_bytes" in text and "_created" not in text
    root = Path(__file__).resolve().parent.parent
    declared = {metric.name for metric in DECLARED}
    used = set()
    for path in (root / "src" / "traceguard").rglob("*.py"):
        used |= set(re.findall(r'(?:inc|counter|gauge|counted|observe|observe_many|_count)\(\s*"(traceguard_[a-z_]+)"',
                               path.read_text()))
    assert used and used <= declared, used - declared
    readme = (root / "README.md").read_text()
    assert markdown_table() in readme.split("<!-- metrics:begin -->")[1].split("<!-- metrics:end -->")[0]
