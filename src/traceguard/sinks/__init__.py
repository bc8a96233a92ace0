"""Sinks: where findings go. One protocol: ``flush()`` makes what was emitted
durable (a source commits its input only after it), ``close()`` is
idempotent and flushes."""

from __future__ import annotations

from typing import Protocol

from traceguard.records import Anomaly
from traceguard.sinks.jsonl import JsonlSink
from traceguard.sinks.memory import MemorySink


class Sink(Protocol):
    def emit(self, anomaly: Anomaly) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


__all__ = ["JsonlSink", "MemorySink", "Sink"]
