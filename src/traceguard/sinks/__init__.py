"""Sinks: where findings and incidents go. One protocol: ``emit`` takes a
finding, ``emit_incident`` an incident state change (a sink keeps what it is
for), ``flush()`` makes what was emitted durable (a source commits its input
only after it), ``close()`` is idempotent and flushes."""

from __future__ import annotations

from typing import Protocol

from traceguard.records import Anomaly, Incident
from traceguard.sinks.jsonl import JsonlSink
from traceguard.sinks.memory import MemorySink


class Sink(Protocol):
    def emit(self, anomaly: Anomaly) -> None: ...

    def emit_incident(self, incident: Incident) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


__all__ = ["JsonlSink", "MemorySink", "Sink"]
