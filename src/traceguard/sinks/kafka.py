"""Kafka topic sink: each finding as its JSON line, keyed by trace id (or by
stage, ``service/operation``, for stage-level findings) so a trace's findings
share a partition. Consumers deduplicate by the finding's deterministic ``id``.
Incident state changes go to the same topic, keyed ``incident/<id>`` and
marked by the header ``traceguard.record: incident`` (findings: ``finding``)."""

from __future__ import annotations

import logging

from kafka import KafkaProducer
from kafka.errors import KafkaError

from traceguard.config import ConsumeConfig
from traceguard.metrics import Metrics
from traceguard.records import Anomaly, Incident

log = logging.getLogger("traceguard.kafka")


def ordered_producer(consume: ConsumeConfig) -> KafkaProducer:
    """The producer of findings, incidents and decided traces. A finding's states (open,
    then resolved) and an incident's updates share an id and are upserted by it downstream:
    a batch retried after a produce error must not land behind a later one, or the stale
    state wins. Idempotence with one request in flight keeps order."""
    return KafkaProducer(bootstrap_servers=consume.bootstrap_servers.split(","), acks="all", linger_ms=20,
                         client_id=f"traceguard-{consume.group}", enable_idempotence=True,
                         max_in_flight_requests_per_connection=1, max_request_size=consume.fetch_max_bytes)


class TopicWriter:
    """Records to one topic whose loss must stop the commit: a record the producer could
    not write (after its own retries) is counted, logged, and makes ``flush`` raise."""

    def __init__(self, producer: KafkaProducer, topic: str, metrics: Metrics, what: str) -> None:
        """``what``: the records, as the log and the error name them."""
        self._producer = producer
        self._topic = topic
        self._metrics = metrics
        self._what = what
        self._failure: Exception | None = None

    def send(self, key: bytes, value: bytes, **kwargs) -> None:
        """``kwargs``: the producer's ``send`` arguments (headers, partition). A send the
        producer refuses at once (its buffer still full after ``max_block_ms``: the broker
        is away) fails like one the broker refused: ``flush`` raises, nothing is committed."""
        if self._failure is not None:
            return  # nothing commits past the failure; sending more would only wait on the broker again
        try:
            future = self._producer.send(self._topic, key=key, value=value, **kwargs)
        except KafkaError as exc:
            self._failed(exc)
            return
        future.add_errback(self._failed)

    @property
    def failing(self) -> Exception | None:
        """The first record's failure, if one could not be written."""
        return self._failure

    def _failed(self, exc: Exception) -> None:
        self._metrics.inc("traceguard_kafka_produce_failures_total", topic=self._topic)
        log.error("%s could not be written to %s: %s", self._what, self._topic, exc)
        self._failure = exc

    def flush(self) -> None:
        """Waits until every record is acknowledged.

        Raises:
            OSError: one could not be written.
        """
        self._producer.flush()
        if self._failure is not None:
            raise OSError(f"writing {self._what} to {self._topic} failed: {self._failure}")


class KafkaTopicSink:
    def __init__(self, producer: KafkaProducer, topic: str, metrics: Metrics) -> None:
        self._writer = TopicWriter(producer, topic, metrics, "findings")
        self._closed = False

    def emit(self, anomaly: Anomaly) -> None:
        key = anomaly.trace_id or f"{anomaly.service}/{anomaly.operation}"
        self._send(key, anomaly.model_dump_json(), b"finding")

    def emit_incident(self, incident: Incident) -> None:
        self._send(f"incident/{incident.id}", incident.model_dump_json(), b"incident")

    def _send(self, key: str, value: str, record: bytes) -> None:
        self._writer.send(key.encode(), value.encode(), headers=[("traceguard.record", record)])

    def flush(self) -> None:
        """Waits until every finding is acknowledged.

        Raises:
            OSError: one could not be written (after the producer's own retries).
        """
        self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flush()
