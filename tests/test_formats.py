"""Replay inputs beyond OTLP/JSON lines: Jaeger JSON, Zipkin v2 JSON, OTLP protobuf,
gzip and zstd, ``--format``. Golden files in tests/data/formats."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from traceguard.config import DecodeConfig
from traceguard.decode.jaeger_json import decode_jaeger
from traceguard.decode.zipkin_json import decode_zipkin, shared_server_id
from traceguard.assemble.assembler import to_span
from traceguard.records import KIND_CLIENT, KIND_SERVER, STATUS_ERROR

GOLDEN = Path(__file__).parent / "data" / "formats"


def replay(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "traceguard", "replay", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def ids(out: Path) -> dict[str, dict]:
    return {f["id"]: f for f in map(json.loads, out.read_text().splitlines())}


def test_jaeger_golden_file():
    spans, logs = decode_jaeger(json.loads((GOLDEN / "jaeger.json").read_text()), DecodeConfig())
    assert spans.rejected == 0 and logs.rejected == 0
    by_name = {row.name: to_span(row) for row in spans.rows}
    root, call, receipt = by_name["GET /checkout"], by_name["POST payment"], by_name["send receipt"]
    assert spans.rows[0].trace_id.hex() == "00000000000000005b8aa5a2d2c872e8"  # 64-bit id, padded
    assert root.parent_span_id is None and root.kind == KIND_SERVER and root.end - root.start == 50_000_000
    assert call.parent_span_id == root.span_id and call.kind == KIND_CLIENT and call.status == STATUS_ERROR
    assert call.attr("http.response.status_code") == 503
    assert receipt.parent_span_id == root.span_id and receipt.has_links and receipt.service == "email"
    [log] = [row for row in logs.rows if row.span_id == call.span_id]
    assert log.severity_number == 17 and log.body == "payment declined: upstream 503"


def test_zipkin_golden_file_gives_a_shared_server_span_its_own_id():
    spans, logs = decode_zipkin(json.loads((GOLDEN / "zipkin.json").read_text()), DecodeConfig())
    assert spans.rejected == 0
    by_kind = {(row.service, to_span(row).kind): to_span(row) for row in spans.rows}
    client, server = by_kind[("frontend", KIND_CLIENT)], by_kind[("cart", KIND_SERVER)]
    assert server.span_id.hex() == shared_server_id("b7ad6b7169203331") != client.span_id.hex()
    assert server.parent_span_id == client.span_id and server.status == STATUS_ERROR
    [log] = logs.rows
    assert log.span_id == server.span_id and log.body == "cache miss"


@pytest.mark.parametrize("args", [
    ("jaeger.json",), ("otlp.jsonl",), ("otlp_traces.pb", "--logs", "otlp_logs.pb")], ids=["jaeger", "otlp_json", "otlp_proto"])
def test_golden_trace_gives_the_same_findings_in_every_format(args, tmp_path):
    """The Jaeger golden trace and its OTLP translation: a CHILD_OF child that outlives
    its parent is flagged, a FOLLOWS_FROM (link) child that does is not, and an orphan
    is a missing parent, each with the trace's logs."""
    result = replay(*(GOLDEN / a if not a.startswith("--") else a for a in args), "--out", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    found = sorted((f["kind"], f["span_id"], len(f["logs"])) for f in ids(tmp_path / "out.jsonl").values())
    assert found == [("context_outlived_parent", "0000000000000004", 2), ("missing_parent", "0000000000000005", 2)]


@pytest.fixture(scope="module")
def exported(scenario_proto, tmp_path_factory):
    """The labeled scenario as OTLP proto (as generated), Jaeger JSON (gzip) and Zipkin JSON (zstd)."""
    from benchmarks.export_formats import to_jaeger, to_zipkin

    directory = tmp_path_factory.mktemp("formats")
    (directory / "jaeger.json.gz").write_bytes(gzip.compress(json.dumps(to_jaeger(scenario_proto)).encode()))
    (directory / "zipkin.json.zst").write_bytes(
        zstandard.ZstdCompressor().compress(json.dumps(to_zipkin(scenario_proto)).encode()))
    return directory


def test_four_formats_give_the_same_findings_up_to_export_order(scenario, scenario_proto, exported, tmp_path):
    """OTLP/JSON lines and OTLP protobuf: identical. Jaeger and Zipkin carry no export
    order, so a late export is on time there: no late_span, and its trace is complete."""
    runs = {
        "otlp_json": (scenario / "traces.jsonl", "--logs", scenario / "logs.jsonl"),
        "otlp_proto": (scenario_proto / "traces.pb", "--logs", scenario_proto / "logs.pb"),
        "jaeger": (exported / "jaeger.json.gz",),
        "zipkin": (exported / "zipkin.json.zst",),
    }
    found = {}
    for name, args in runs.items():
        result = replay(*args, "--out", tmp_path / f"{name}.jsonl")
        assert result.returncode == 0, result.stderr
        found[name] = ids(tmp_path / f"{name}.jsonl")
    assert set(found["otlp_json"]) == set(found["otlp_proto"])
    late = {f["trace_id"] for f in found["otlp_proto"].values() if f["kind"] == "late_span"}
    assert late
    expected = {k for k, f in found["otlp_proto"].items()
                if f["kind"] != "late_span" and not (f["kind"] == "missing_expected_span" and f["trace_id"] in late)}
    assert set(found["jaeger"]) == expected == set(found["zipkin"])
    assert sum(1 for f in found["jaeger"].values() if f["logs"]) >= 0.95 * len(expected)  # span logs kept


def test_a_wrong_format_names_the_file():
    result = replay(GOLDEN / "zipkin.json", "--format", "jaeger")
    assert result.returncode == 2 and "zipkin.json is not jaeger: it looks like zipkin" in result.stderr


def test_a_corrupt_document_is_reported_and_skipped(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [{"traceID": ')
    result = replay(broken, "--out", tmp_path / "out.jsonl")
    assert result.returncode == 0 and "broken.json: corrupt, skipped" in result.stderr
