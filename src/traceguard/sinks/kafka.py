"""Kafka topic sink: each finding as its JSON line, keyed by trace id (or by
stage, ``service/operation``, for stage-level findings) so a trace's findings
share a partition. Consumers deduplicate by the finding's deterministic ``id``.
Incident state changes go to the same topic, keyed ``incident/<id>`` and
marked by the header ``traceguard.record: incident`` (findings: ``finding``)."""

from __future__ import annotations

import logging

from kafka import KafkaProducer

from traceguard.metrics import Metrics
from traceguard.records import Anomaly, Incident

log = logging.getLogger("traceguard.kafka")


class KafkaTopicSink:
    def __init__(self, producer: KafkaProducer, topic: str, metrics: Metrics) -> None:
        self._producer = producer
        self._topic = topic
        self._metrics = metrics
        self._failure: Exception | None = None
        self._closed = False

    def emit(self, anomaly: Anomaly) -> None:
        key = anomaly.trace_id or f"{anomaly.service}/{anomaly.operation}"
        self._send(key, anomaly.model_dump_json(), b"finding")

    def emit_incident(self, incident: Incident) -> None:
        self._send(f"incident/{incident.id}", incident.model_dump_json(), b"incident")

    def _send(self, key: str, value: str, record: bytes) -> None:
        future = self._producer.send(self._topic, key=key.encode(), value=value.encode(),
                                     headers=[("traceguard.record", record)])
        future.add_errback(self._failed)

    def _failed(self, exc: Exception) -> None:
        self._metrics.inc("traceguard_kafka_produce_failures_total", topic=self._topic)
        log.error("a finding could not be written to %s: %s", self._topic, exc)
        self._failure = exc

    def flush(self) -> None:
        """Waits until every finding is acknowledged.

        Raises:
            OSError: one could not be written (after the producer's own retries).
        """
        self._producer.flush()
        if self._failure is not None:
            raise OSError(f"writing findings to {self._topic} failed: {self._failure}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flush()
