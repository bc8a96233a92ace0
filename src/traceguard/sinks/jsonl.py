"""JSONL sink: one ``Anomaly`` per line, the format of DESIGN.md's contract."""

from __future__ import annotations

from typing import IO

from traceguard.records import Anomaly


class JsonlSink:
    def __init__(self, stream: IO[str], *, owns_stream: bool = False) -> None:
        self._stream = stream
        self._owns = owns_stream
        self._closed = False

    def emit(self, anomaly: Anomaly) -> None:
        self._stream.write(anomaly.model_dump_json())
        self._stream.write("\n")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.flush()
        if self._owns:
            self._stream.close()
