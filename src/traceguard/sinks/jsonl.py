"""JSONL sink: one ``Anomaly`` per line, the format of DESIGN.md's contract;
or, made with ``incidents=True``, one ``Incident`` state change per line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from traceguard.records import Anomaly, Incident


_TAIL = 4 << 20  # far longer than a finding with all its linked logs


class JsonlSink:
    def __init__(self, stream: IO[str], *, owns_stream: bool = False, incidents: bool = False) -> None:
        self._stream = stream
        self._incidents = incidents
        self._owns = owns_stream
        self._closed = False

    @classmethod
    def append_to(cls, path: Path, incidents: bool = False) -> "JsonlSink":
        """Appends to ``path``, first cutting off a torn last line that a killed
        process left: it was written after the last commit, so the source
        delivers its finding again."""
        if path.exists():
            with open(path, "rb+") as existing:
                size = existing.seek(0, os.SEEK_END)
                start = max(0, size - _TAIL)
                existing.seek(start)
                tail = existing.read()
                if tail and not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    if cut >= 0 or start == 0:
                        existing.truncate(start + cut + 1)
                    else:  # a line longer than any finding: keep it, end it
                        existing.write(b"\n")
        return cls(open(path, "a", encoding="utf-8"), owns_stream=True, incidents=incidents)

    def emit(self, anomaly: Anomaly) -> None:
        if not self._incidents:
            self._stream.write(anomaly.model_dump_json())
            self._stream.write("\n")

    def emit_incident(self, incident: Incident) -> None:
        if self._incidents:
            self._stream.write(incident.model_dump_json())
            self._stream.write("\n")

    def flush(self) -> None:
        self._stream.flush()
        try:
            os.fsync(self._stream.fileno())
        except (OSError, ValueError):  # stdout to a pipe or terminal: nothing to sync
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.flush()
        if self._owns:
            self._stream.close()
