"""Peak RSS of ``traceguard replay`` over a small and a large input: memory must
follow the assembler's bounds, not the file size.

A scenario is generated once as length-prefixed OTLP protobuf; the large file
is that traffic repeated back to back, each copy shifted later in event time
by the scenario's duration and given fresh trace ids (the copy number XORed
into the id), so it is new traffic, not a replay of the old. With ``--format
jaeger`` or ``zipkin`` each copy is translated (benchmarks.export_formats) and
the copies are written as one JSON document, as a download of that size would
be. Each replay runs as its own process, which reports its own peak RSS
(``VmHWM`` of /proc/self/status) as it exits. Not ``getrusage`` of the
children: Linux carries a process's peak RSS across ``execve``, and a child
forked (or vforked) from this process starts with this process's memory, so
that figure is at least the benchmark's own peak (which holds a translated
copy of the traffic), not the replay's.

Run ``python -m benchmarks.replay_memory [--small-mb 50] [--large-mb 1000] [--format otlp_proto]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.kafka_feed import read_length_prefixed
from benchmarks.scenario import SECOND, ScenarioConfig, length_prefixed, write_scenario


def _shift(trace_id: bytes, copy: int) -> bytes:
    return trace_id[:12] + (int.from_bytes(trace_id[12:], "big") ^ copy).to_bytes(4, "big")


def copies(base: Path, copy: int, offset_ns: int) -> tuple[bytes, bytes]:
    """The base traffic as copy number ``copy``: later by ``copy * offset_ns``, new trace ids."""
    traces, logs = bytearray(), bytearray()
    for request in read_length_prefixed(base / "traces.pb", ExportTraceServiceRequest):
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    span.trace_id = _shift(span.trace_id, copy)
                    span.start_time_unix_nano += copy * offset_ns
                    if span.end_time_unix_nano:
                        span.end_time_unix_nano += copy * offset_ns
        traces += length_prefixed(request)
    for request in read_length_prefixed(base / "logs.pb", ExportLogsServiceRequest):
        for resource_logs in request.resource_logs:
            for scope in resource_logs.scope_logs:
                for record in scope.log_records:
                    record.trace_id = _shift(record.trace_id, copy)
                    record.time_unix_nano += copy * offset_ns
        logs += length_prefixed(request)
    return bytes(traces), bytes(logs)


def build(base: Path, target: Path, megabytes: int, duration_s: float, fmt: str) -> tuple[int, list[Path]]:
    """Writes at least ``megabytes`` of traces into ``target``; returns the number of copies and the replay's arguments."""
    target.mkdir(parents=True, exist_ok=True)
    if fmt != "otlp_proto":
        return _build_document(base, target, megabytes, duration_s, fmt)
    n = 0
    with open(target / "traces.pb", "wb") as traces, open(target / "logs.pb", "wb") as logs:
        while traces.tell() < megabytes * 1_000_000:
            spans_part, logs_part = copies(base, n, int(duration_s * SECOND))
            traces.write(spans_part)
            logs.write(logs_part)
            n += 1
    return n, [target / "traces.pb", "--logs", target / "logs.pb"]


def _build_document(base: Path, target: Path, megabytes: int, duration_s: float, fmt: str) -> tuple[int, list]:
    """The copies as one Jaeger (``{"data": [traces]}``) or Zipkin (``[spans]``) document."""
    from benchmarks.export_formats import to_jaeger, to_zipkin

    scratch, path = target / "copy", target / f"{fmt}.json"
    scratch.mkdir()
    n = 0
    with open(path, "w") as out:
        out.write('{"data": [' if fmt == "jaeger" else "[")
        while out.tell() < megabytes * 1_000_000:
            spans_part, logs_part = copies(base, n, int(duration_s * SECOND))
            (scratch / "traces.pb").write_bytes(spans_part)
            (scratch / "logs.pb").write_bytes(logs_part)
            elements = to_jaeger(scratch)["data"] if fmt == "jaeger" else to_zipkin(scratch)
            out.write(("," if n else "") + ",".join(map(json.dumps, elements)))
            n += 1
        out.write("]}" if fmt == "jaeger" else "]")
    for part in scratch.iterdir():
        part.unlink()
    scratch.rmdir()
    return n, [path]


_REPORT_PEAK = """
import sys
from traceguard.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    sys.stderr.write(f"peak-rss-kib {peak}\\n")
sys.exit(code)
"""


def peak_rss_replay(arguments: list) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, summary line) of one replay in a child process."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _REPORT_PEAK, "replay", *map(str, arguments),
                             "--out", "/dev/null", "--no-progress"],
                            capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    lines = result.stderr.splitlines()
    peak_kib = int(next(line.split()[1] for line in lines if line.startswith("peak-rss-kib")))
    return peak_kib / 1024, seconds, next((line for line in lines if line.startswith("traceguard replay")), lines[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-mb", type=int, default=50)
    parser.add_argument("--large-mb", type=int, default=1000)
    parser.add_argument("--traces", type=int, default=10_000, help="requests in the base scenario")
    parser.add_argument("--format", choices=("otlp_proto", "jaeger", "zipkin"), default="otlp_proto")
    args = parser.parse_args()
    config = ScenarioConfig(traces=args.traces, duration_s=args.traces / 3)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        write_scenario(base, config, proto=True)
        results = {}
        for name, megabytes in (("small", args.small_mb), ("large", args.large_mb)):
            directory = Path(tmp) / name
            n, arguments = build(base, directory, megabytes, config.duration_s, args.format)
            size = sum(path.stat().st_size for path in directory.iterdir())
            rss, seconds, summary = peak_rss_replay(arguments)
            results[name] = {"copies": n, "bytes": size, "peak_rss_mib": round(rss, 1),
                             "seconds": round(seconds, 1), "summary": summary}
            for path in directory.iterdir():
                path.unlink()
    print(json.dumps({"benchmark": "replay_memory", "format": args.format, "python": sys.version.split()[0], **results,
                      "rss_ratio_large_to_small": round(results["large"]["peak_rss_mib"]
                                                        / results["small"]["peak_rss_mib"], 3)}, indent=2))


if __name__ == "__main__":
    main()
