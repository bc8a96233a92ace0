"""Replay files → decoded batches, merged across files by event time.

Formats, sniffed per file: OTLP/JSON lines (the Collector's file exporter,
``{`` first) and OTLP protobuf with a 4-byte big-endian length before each
message (the file exporter's ``proto`` format). gzip by magic bytes. A line
that cannot be decoded becomes a ``Batch`` with ``corrupt`` set, naming the
file and line, so the front end decides whether that is fatal.
"""

from __future__ import annotations

import gzip
import heapq
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

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

Signal = Literal["traces", "logs"]
_GZIP_MAGIC = b"\x1f\x8b"
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
    if raw.peek(2)[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def read_file(path: Path, signal: Signal, config: DecodeConfig, stages: StageAttributes) -> Iterator[Batch]:
    """Batches of one file. ``signal`` is what a protobuf file holds (JSON lines say it themselves)."""
    with open_input(path) as stream:
        head = stream.peek(64)[:64].lstrip() if hasattr(stream, "peek") else b""
        if not head:
            return
        if head[:1] == b"{":
            yield from _json_lines(path, stream, config, stages)
        else:
            yield from _length_prefixed(path, stream, signal, config, stages)


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


def _batch(signal: Signal, where: str, decoded) -> Batch:
    return Batch(signal, where, decoded.rows, decoded.rejected, decoded.errors)


def replay_batches(
    trace_paths: list[Path], log_paths: list[Path], config: DecodeConfig
) -> Iterator[Batch]:
    """All files' batches, merged by batch event time so logs keep pace with spans."""
    stages = StageAttributes(config.max_stages)
    streams = [read_file(p, "traces", config, stages) for p in trace_paths]
    streams += [read_file(p, "logs", config, stages) for p in log_paths]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=Batch.event_time)
