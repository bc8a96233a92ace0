"""Replay files → decoded batches, merged across files by event time.

Formats, sniffed per file (``auto``) or named: OTLP/JSON lines (the
Collector's file exporter, ``{`` first), OTLP protobuf with a 4-byte
big-endian length before each message (the file exporter's ``proto``
format), Jaeger JSON (``{"data": [...]}``, as the Jaeger UI downloads it) and
Zipkin v2 JSON (``[...]``). gzip and zstd by magic bytes. A line that cannot
be decoded becomes a ``Batch`` with ``corrupt`` set, naming the file and
line, so the front end decides whether that is fatal.

Jaeger and Zipkin files are one JSON document each, read whole; they carry no
export order, so their spans are replayed in end-time order (a span exported
late is on time there).
"""

from __future__ import annotations

import gzip
import heapq
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

import orjson

from traceguard.config import DecodeConfig
from traceguard.decode import (
    DecodeError,
    decode_json_line,
    decode_logs_json,
    decode_logs_proto,
    decode_traces_json,
    decode_traces_proto,
)
from traceguard.decode.common import StageAttributes
from traceguard.decode.jaeger_json import decode_jaeger
from traceguard.decode.zipkin_json import decode_zipkin
from traceguard.records import SPAN_CORE

Signal = Literal["traces", "logs"]
Format = Literal["auto", "otlp_json", "otlp_proto", "jaeger", "zipkin"]
FORMATS: tuple[str, ...] = Format.__args__
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1024  # rows per batch of a whole-document format


class WrongFormat(ValueError):
    """``--format`` names a format the file is not in; the message names the file."""
_LENGTH = struct.Struct(">I")


@dataclass(slots=True)
class Batch:
    signal: Signal
    where: str
    rows: list = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    corrupt: bool = False

    def event_time(self) -> int:
        """The earliest event in the batch: the key that merges files in event time."""
        if self.signal == "traces":
            return min((row.end for row in self.rows if row.end), default=0)
        return min((row.time for row in self.rows if row.time), default=0)


def open_input(path: Path) -> BinaryIO:
    raw = open(path, "rb")
    magic = raw.peek(4)[:4]
    if magic[:2] == _GZIP_MAGIC:
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore
    return raw


def sniff(head: bytes) -> str:
    """The format of a file from its first bytes (after decompression)."""
    head = head.lstrip()
    if head[:1] == b"[":
        return "zipkin"
    if head[:1] == b"{":
        return "jaeger" if head[1:].lstrip().startswith(b'"data"') else "otlp_json"
    return "otlp_proto"


def read_file(path: Path, signal: Signal, config: DecodeConfig, stages: StageAttributes,
              fmt: str = "auto") -> Iterator[Batch]:
    """Batches of one file. ``signal`` is what a protobuf file holds (the other formats say it themselves).

    Raises:
        WrongFormat: ``fmt`` is not the format the file is in.
    """
    with open_input(path) as stream:
        head = stream.peek(256)[:256]
        if not head.strip():
            return
        found = sniff(head)
        if fmt != "auto" and fmt != found:
            raise WrongFormat(f"{path} is not {fmt}: it looks like {found}")
        if found == "otlp_json":
            yield from _json_lines(path, stream, config, stages)
        elif found == "otlp_proto":
            yield from _length_prefixed(path, stream, signal, config, stages)
        else:
            yield from _document(path, stream, found, config, stages)


def _json_lines(path: Path, stream: BinaryIO, config: DecodeConfig, stages: StageAttributes) -> Iterator[Batch]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            signal, document = decode_json_line(line)
            if signal == "traces":
                decoded = decode_traces_json(document, config, stages)
            else:
                decoded = decode_logs_json(document, config)
        except DecodeError as exc:
            yield Batch("traces", where, errors=[str(exc)], corrupt=True)
            continue
        yield _batch(signal, where, decoded)


def _length_prefixed(
    path: Path, stream: BinaryIO, signal: Signal, config: DecodeConfig, stages: StageAttributes
) -> Iterator[Batch]:
    number = 0
    while True:
        number += 1
        where = f"{path}:message {number}"
        prefix = stream.read(4)
        if not prefix:
            return
        length = _LENGTH.unpack(prefix)[0] if len(prefix) == 4 else -1
        body = stream.read(length) if length >= 0 else b""
        if length < 0 or len(body) != length:
            yield Batch(signal, where, errors=["truncated: the file ends inside this message"], corrupt=True)
            return
        try:
            if signal == "traces":
                decoded = decode_traces_proto(body, config, stages)
            else:
                decoded = decode_logs_proto(body, config)
        except DecodeError as exc:
            yield Batch(signal, where, errors=[str(exc)], corrupt=True)
            continue
        yield _batch(signal, where, decoded)


def _document(path: Path, stream: BinaryIO, fmt: str, config: DecodeConfig,
              stages: StageAttributes) -> Iterator[Batch]:
    """A whole Jaeger or Zipkin document, replayed in end-time order in chunks."""
    try:
        document = orjson.loads(stream.read())
        spans, logs = (decode_jaeger if fmt == "jaeger" else decode_zipkin)(document, config, stages)
    except (orjson.JSONDecodeError, DecodeError) as exc:
        yield Batch("traces", str(path), errors=[str(exc)], corrupt=True)
        return
    spans.rows.sort(key=lambda row: row.end or SPAN_CORE.unpack(row.core)[2])
    logs.rows.sort(key=lambda row: row.time)
    yield from heapq.merge(_chunks(path, "traces", spans), _chunks(path, "logs", logs), key=Batch.event_time)


def _chunks(path: Path, signal: Signal, decoded) -> Iterator[Batch]:
    rows = decoded.rows
    for start in range(0, len(rows), _CHUNK):
        first = start == 0
        yield Batch(signal, f"{path}:{signal} {start + 1}-{start + len(rows[start:start + _CHUNK])}",
                    rows[start:start + _CHUNK], decoded.rejected if first else 0, decoded.errors if first else [])
    if not rows and decoded.rejected:
        yield Batch(signal, f"{path}:{signal}", [], decoded.rejected, decoded.errors)


def _batch(signal: Signal, where: str, decoded) -> Batch:
    return Batch(signal, where, decoded.rows, decoded.rejected, decoded.errors)


def replay_batches(
    trace_paths: list[Path], log_paths: list[Path], config: DecodeConfig, fmt: str = "auto"
) -> Iterator[Batch]:
    """All files' batches, merged by batch event time so logs keep pace with spans."""
    stages = StageAttributes(config.max_stages)
    streams = [read_file(p, "traces", config, stages, fmt) for p in trace_paths]
    streams += [read_file(p, "logs", config, stages, fmt) for p in log_paths]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=Batch.event_time)
