"""Replay files → decoded batches, merged across files by event time.

Formats, sniffed per file (``auto``) or named: OTLP/JSON lines (the
Collector's file exporter, ``{`` first), OTLP protobuf with a 4-byte
big-endian length before each message (the file exporter's ``proto``
format), Jaeger JSON (``{"data": [...]}``, as the Jaeger UI downloads it) and
Zipkin v2 JSON (``[...]``). gzip and zstd by magic bytes. A line that cannot
be decoded becomes a ``Batch`` with ``corrupt`` set, naming the file and
line, so the front end decides whether that is fatal.

Jaeger and Zipkin files are one JSON document each, streamed an element at a
time (a Jaeger trace, a Zipkin span) so memory does not follow the file size.
They carry no export order, so their spans are replayed in end-time order
through a bounded buffer (a span exported late is on time there).
"""

from __future__ import annotations

import gzip
import heapq
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

import ijson

from traceguard.config import DecodeConfig
from traceguard.decode import (
    DecodeError,
    decode_json_line,
    decode_logs_json,
    decode_logs_proto,
    decode_traces_json,
    decode_traces_proto,
)
from traceguard.decode.common import Decoded, StageAttributes
from traceguard.decode.jaeger_json import decode_jaeger_traces
from traceguard.decode.zipkin_json import decode_zipkin_spans
from traceguard.native import rows as native
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
    out_of_order: int = 0
    events: list = field(default_factory=list)  # traces: the spans' events as log records

    def event_time(self) -> int:
        """The earliest event in the batch: the key that merges files in event time
        (an unfinished span's event is its start)."""
        if self.signal == "traces":
            times = [row.end for row in self.rows]
            if 0 in times:  # rare: SpanRow.start unpacks the row
                times = [row.end or row.start for row in self.rows]
        else:
            times = [row.time for row in self.rows]
        return min(filter(None, times), default=0)


def open_input(path: Path) -> BinaryIO:
    raw = open(path, "rb")
    magic = raw.peek(4)[:4]
    if magic[:2] == _GZIP_MAGIC:
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore
    return raw


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError


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
        try:
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
        except _decompression_errors() as exc:
            # what came before is replayed; the file ends here, like a line that does not decode
            yield Batch(signal, str(path), corrupt=True,
                        errors=[f"the compressed file is corrupt or truncated: {type(exc).__name__}: {exc}"])


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
    """A Jaeger or Zipkin document, read a chunk of elements at a time and replayed
    in end-time order through a buffer of ``config.reorder_rows`` rows.

    JSON that breaks off ends the file there: what came before it is replayed.
    """
    prefix, element, per_chunk, decode = _ELEMENTS[fmt]
    order = _EndTimeOrder(path, config.reorder_rows)
    chunk: list = []
    number = 0
    try:
        for number, item in enumerate(ijson.items(_NestingLimit(stream, config.max_json_depth), prefix,
                                                  use_float=True), 1):
            chunk.append(item)
            if len(chunk) == per_chunk:
                yield from order.push(f"{path}:{element} {number - len(chunk) + 1}-{number}", *decode(chunk, config, stages))
                chunk = []
    except (ijson.JSONError, TooDeep) as exc:
        corrupt = Batch("traces", f"{path}:{element} {number + 1}", errors=[f"not valid JSON: {exc}"], corrupt=True)
    else:
        corrupt = None
    if chunk:
        yield from order.push(f"{path}:{element} {number - len(chunk) + 1}-{number}", *decode(chunk, config, stages))
    if corrupt is not None:
        yield corrupt
    yield from order.drain()


class TooDeep(ValueError):
    """JSON nested deeper than ``decode.max_json_depth``."""


def _json_nesting(chunk: bytes, depth: int, state: int, limit: int) -> tuple[int, int]:
    """The reference for ``_rows.json_nesting`` (see there)."""
    in_string, escaped = state & 1, state & 2
    for c in chunk:
        if in_string:
            if escaped:
                escaped = 0
            elif c == 0x5C:  # backslash
                escaped = 2
            elif c == 0x22:  # quote
                in_string = 0
        elif c == 0x22:
            in_string = 1
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                break
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
    return depth, in_string | escaped


json_nesting = native.json_nesting if native is not None else _json_nesting


class _NestingLimit:
    """A stream for the streaming JSON parser that stops at the first bracket
    past ``limit``: the parser builds a path per event, so a file of 60 KB of
    ``[`` cost it 9 GB; this check costs a byte scan in C."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream, self._limit = stream, limit
        self._depth, self._state = 0, 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._depth, self._state = json_nesting(data, self._depth, self._state, self._limit)
        if self._depth > self._limit:
            raise TooDeep(f"nested deeper than {self._limit} levels (decode.max_json_depth)")
        return data


# format → (ijson prefix of one element, what an element is, elements per decode, decoder)
_ELEMENTS = {
    "jaeger": ("data.item", "trace", 64, decode_jaeger_traces),
    "zipkin": ("item", "span", _CHUNK, decode_zipkin_spans),
}


class _EndTimeOrder:
    """Decoded rows out in event-time order (span end, log time), at most ``limit`` held.

    A row that arrives after a later one has already left cannot be put back in
    order: it goes out at once and is counted, and the count is reported at the
    end, because the assembler may then see it as a late span.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self._path, self._limit = path, limit
        self._heap: list[tuple[int, int, Signal, object]] = []
        self._sequence = 0
        self._last_out = 0
        self._out_of_order = 0
        self._counts = {"traces": 0, "logs": 0}
        self._pending: list = []
        self._pending_signal: Signal = "traces"

    def push(self, where: str, spans: Decoded, logs: Decoded) -> Iterator[Batch]:
        for signal, decoded in (("traces", spans), ("logs", logs)):
            if decoded.rejected:
                yield Batch(signal, where, [], decoded.rejected, decoded.errors)
            for row in decoded.rows:
                time = (row.end or SPAN_CORE.unpack(row.core)[2]) if signal == "traces" else row.time
                if time < self._last_out:
                    self._out_of_order += 1
                heapq.heappush(self._heap, (time, self._sequence, signal, row))
                self._sequence += 1
        while len(self._heap) > self._limit:
            yield from self._pop()

    def drain(self) -> Iterator[Batch]:
        while self._heap:
            yield from self._pop()
        yield from self._flush()
        if self._out_of_order:
            yield Batch("traces", str(self._path), out_of_order=self._out_of_order, errors=[
                f"{self._out_of_order} row(s) were further from end-time order than decode.reorder_rows "
                f"({self._limit}) holds and were replayed out of order (a late_span among them may be one)"])

    def _pop(self) -> Iterator[Batch]:
        time, _, signal, row = heapq.heappop(self._heap)
        if signal != self._pending_signal:
            yield from self._flush()
            self._pending_signal = signal
        self._last_out = max(self._last_out, time)
        self._pending.append(row)
        if len(self._pending) == _CHUNK:
            yield from self._flush()

    def _flush(self) -> Iterator[Batch]:
        if self._pending:
            signal, first = self._pending_signal, self._counts[self._pending_signal] + 1
            self._counts[signal] += len(self._pending)
            yield Batch(signal, f"{self._path}:{signal} {first}-{self._counts[signal]}", self._pending)
            self._pending = []


def _batch(signal: Signal, where: str, decoded) -> Batch:
    return Batch(signal, where, decoded.rows, decoded.rejected, decoded.errors, events=decoded.events)


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
