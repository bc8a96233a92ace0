"""Replay inputs beyond OTLP/JSON lines: Jaeger JSON, Zipkin v2 JSON, OTLP protobuf,
gzip and zstd, ``--format``. Golden files in tests/data/formats."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from traceguard.config import DecodeConfig
from traceguard.decode.common import StageAttributes
from traceguard.sources.replay import Batch, read_file
from traceguard.decode.jaeger_json import decode_jaeger_traces
from traceguard.decode.zipkin_json import decode_zipkin_spans, shared_server_id
from traceguard.assemble.assembler import to_span
from traceguard.records import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, LogRow
from builders import MS, T0, row

GOLDEN = Path(__file__).parent / "data" / "formats"


def replay(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "traceguard", "replay", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def ids(out: Path) -> dict[str, dict]:
    return {f["id"]: f for f in map(json.loads, out.read_text().splitlines())}


def test_jaeger_golden_file():
    spans, logs = decode_jaeger_traces(json.loads((GOLDEN / "jaeger.json").read_text())["data"], DecodeConfig())
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
    spans, logs = decode_zipkin_spans(json.loads((GOLDEN / "zipkin.json").read_text()), DecodeConfig())
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
    order, so a late export is on time there: no late_span, and its trace is complete.
    Every complete trace teaches stage presence, so those traces also teach a
    presence that differs by the late stage: ``missing_expected_span`` is compared
    only between the two OTLP encodings."""
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
    order_free = lambda run: {k for k, f in run.items() if f["kind"] not in ("late_span", "missing_expected_span")}  # noqa: E731
    expected = order_free(found["otlp_proto"])
    assert order_free(found["jaeger"]) == expected == order_free(found["zipkin"])
    assert sum(1 for f in found["jaeger"].values() if f["logs"]) >= 0.95 * len(expected)  # span logs kept


def test_a_wrong_format_names_the_file():
    result = replay(GOLDEN / "zipkin.json", "--format", "jaeger")
    assert result.returncode == 2 and "zipkin.json is not jaeger: it looks like zipkin" in result.stderr


def test_a_document_that_breaks_off_keeps_what_came_before(tmp_path):
    """The golden Jaeger trace, then a second trace cut off mid-way: the first is
    replayed (its findings as from the whole golden file), the rest is reported."""
    golden = json.dumps(json.loads((GOLDEN / "jaeger.json").read_text()))
    assert golden.endswith("]}")
    broken = tmp_path / "broken.json"
    broken.write_text(golden[:-2] + ', {"traceID": "5b8aa5a2d2c872e9", "spans": [{"spanID"')
    result = replay(broken, "--out", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    assert "broken.json:trace 2: corrupt, skipped: not valid JSON" in result.stderr
    assert sorted(f["kind"] for f in ids(tmp_path / "out.jsonl").values()) == [
        "context_outlived_parent", "missing_parent"]


def zipkin_span(number: int, end_us: int) -> dict:
    return {"traceId": f"{number:032x}", "id": f"{number + 1:016x}", "name": "work", "kind": "SERVER",
            "timestamp": end_us - 1000, "duration": 1000, "localEndpoint": {"serviceName": "svc"}}


def rows_out(path: Path, config: DecodeConfig) -> tuple[list, list[Batch]]:
    batches = list(read_file(path, "traces", config, StageAttributes()))
    return [row for b in batches if b.signal == "traces" for row in b.rows], batches


def test_spans_come_out_in_end_time_order_within_the_buffer_and_the_rest_is_counted(tmp_path):
    """Ends shuffled within blocks of 50: a buffer of 50 rows restores the order;
    a buffer of 10 cannot, says how many rows it replayed out of order, and loses none."""
    rng = random.Random(7)
    ends = []
    for block in range(40):
        part = [1_767_225_600_000_000 + (block * 50 + i) * 1000 for i in range(50)]
        rng.shuffle(part)
        ends += part
    path = tmp_path / "zipkin.json"
    path.write_text(json.dumps([zipkin_span(n, end) for n, end in enumerate(ends, 1)]))

    rows, batches = rows_out(path, DecodeConfig(reorder_rows=50))
    assert [row.end for row in rows] == sorted(end * 1000 for end in ends)
    assert not any(b.out_of_order for b in batches)

    rows, batches = rows_out(path, DecodeConfig(reorder_rows=10))
    assert sorted(row.end for row in rows) == sorted(end * 1000 for end in ends)
    [report] = [b for b in batches if b.out_of_order]
    disorder = sum(1 for a, b in zip(rows, rows[1:]) if b.end < a.end)
    assert 0 < disorder <= report.out_of_order < len(rows)
    assert "decode.reorder_rows (10)" in report.errors[0]


def test_a_malformed_span_is_rejected_alone(tmp_path):
    path = tmp_path / "zipkin.json"
    path.write_text(json.dumps([zipkin_span(1, 2_000_000), "not a span", zipkin_span(2, 3_000_000)]))
    rows, batches = rows_out(path, DecodeConfig())
    assert len(rows) == 2
    [rejected] = [b for b in batches if b.rejected]
    assert rejected.rejected == 1 and rejected.where.endswith("zipkin.json:span 1-3")
    assert "malformed Zipkin span" in rejected.errors[0]


def test_a_document_is_streamed_not_read_whole(tmp_path):
    """Peak Python heap while reading Zipkin files through a 2,000-row buffer does not
    follow the file size: 40,000 spans (~7.5 MB) need no more than 10,000 do."""
    def peak_heap(spans: int) -> int:
        path = tmp_path / f"zipkin{spans}.json.gz"
        with gzip.open(path, "wt") as out:
            out.write("[" + ",".join(json.dumps(zipkin_span(n, 2_000_000 + n)) for n in range(1, spans + 1)) + "]")
        tracemalloc.start()
        try:
            count = sum(len(b.rows) for b in read_file(path, "traces", DecodeConfig(reorder_rows=2_000),
                                                        StageAttributes()))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == spans
        return peak

    small, large = peak_heap(10_000), peak_heap(40_000)
    assert large < 1.2 * small, (small, large)


def test_a_batch_merges_by_its_earliest_event_an_unfinished_span_by_its_start():
    """Files are merged by this key: finished spans by their end, an unfinished one
    (end 0) by its start, log records by their time; zero times do not count."""
    finished = Batch("traces", "f", rows=[row(1, 1, start_ms=0, end_ms=30), row(1, 2, start_ms=5, end_ms=20)])
    assert finished.event_time() == T0 + 20 * MS
    unfinished = Batch("traces", "u", rows=[row(1, 1, start_ms=0, end_ms=30), row(1, 2, start_ms=12, end_ms=None)])
    assert unfinished.event_time() == T0 + 12 * MS
    logs = Batch("logs", "l", rows=[LogRow(b"\1" * 16, None, 0, 9, "", "x", "svc"),
                                    LogRow(b"\1" * 16, None, T0 + 7, 9, "", "y", "svc")])
    assert logs.event_time() == T0 + 7
    assert Batch("traces", "e").event_time() == 0 == Batch("logs", "e").event_time()
