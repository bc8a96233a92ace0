"""MemorySink: keeps findings in a list; the test double for every sink."""

from __future__ import annotations

from traceguard.records import Anomaly


class MemorySink:
    def __init__(self) -> None:
        self.anomalies: list[Anomaly] = []
        self.closed = False

    def emit(self, anomaly: Anomaly) -> None:
        self.anomalies.append(anomaly)

    def flush(self) -> None:
        """Nothing to make durable."""

    def close(self) -> None:
        self.closed = True
