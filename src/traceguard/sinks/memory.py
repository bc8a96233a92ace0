"""MemorySink: keeps findings and incident updates in lists; the test double for every sink."""

from __future__ import annotations

from traceguard.records import Anomaly, Incident


class MemorySink:
    def __init__(self) -> None:
        self.anomalies: list[Anomaly] = []
        self.incidents: list[Incident] = []
        self.closed = False

    def emit(self, anomaly: Anomaly) -> None:
        self.anomalies.append(anomaly)

    def emit_incident(self, incident: Incident) -> None:
        self.incidents.append(incident)

    def flush(self) -> None:
        """Nothing to make durable."""

    def close(self) -> None:
        self.closed = True
