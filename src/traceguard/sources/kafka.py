"""The Kafka source: one member of a consumer group reading what the
OpenTelemetry Collector's kafka exporter writes (one ExportTraceServiceRequest
/ ExportLogsServiceRequest per message, ``otlp_proto`` or ``otlp_json``).

At least once, nothing lost: offsets are committed only up to the oldest
record whose traces are still undecided (``kafka_offsets``), after the sinks
have flushed. On revocation the partitions' undecided traces are dropped (the
next owner reads them again from the committed offset).

Event time (``--time event``, backfills) merges the assigned partitions by
the event time of their next record, as replay merges files, waiting for a
partition that is behind unless it has caught up with its end: decisions do
not depend on how the broker happens to interleave partitions. Fetched
records wait in a bounded buffer per partition; a full buffer pauses its
partition. With the wall clock, reaching the in-flight bound pauses every
partition until decisions free room (with event time the bound decides the
oldest traces early, as replay does, since time only moves by reading).

Poison records (a value that does not decode as the configured encoding)
are counted, logged with topic/partition/offset, optionally copied to a
dead-letter topic, and skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import orjson
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig
from traceguard.decode import DecodeError, decode_logs_json, decode_logs_proto, decode_traces_json, decode_traces_proto
from traceguard.decode.common import StageAttributes
from traceguard.pipeline import Pipeline
from traceguard.sources.kafka_offsets import OffsetTracker, after_straddlers
from traceguard.sources.replay import Batch

log = logging.getLogger("traceguard.kafka")


class SinkFailed(RuntimeError):
    """A sink could not make findings durable; offsets must not be committed past them."""


@contextlib.contextmanager
def sinks_must_flush():
    """What a sink's flush or close raises (the broker, the disk) as ``SinkFailed``."""
    try:
        yield
    except (KafkaError, OSError) as exc:
        raise SinkFailed(f"findings could not be made durable: {exc}") from exc


def require_stored(store) -> None:
    """Raises ``SinkFailed`` while the findings store holds findings back (the disk
    refuses writes), after writing what it can of them."""
    if store.backlog and not store.retry():
        raise SinkFailed(f"findings could not be made durable: the findings store cannot write ({store.failing})")


@dataclass(slots=True)
class _Record(Batch):
    """A decoded message; ``corrupt`` for a poison record."""

    partition: TopicPartition | None = None
    offset: int = 0
    head_time: int = 0  # its earliest event: the key of the event-time merge


class KafkaSource:
    """Feeds a pipeline from the traces and logs topics; ``run()`` until stopped or caught up."""

    def __init__(self, config: PipelineConfig, pipeline: Pipeline, tracker: OffsetTracker,
                 clock: EventTimeClock | None, producer: KafkaProducer | None = None,
                 on_commit: Callable[[], None] | None = None,
                 relink: Callable[[bytes, list], None] | None = None,
                 between_polls: Callable[[], None] | None = None) -> None:
        """``clock`` is the pipeline's event-time clock (None: wall time); ``producer`` is
        shared with the anomalies sink and carries dead letters; ``on_commit`` runs after the
        sinks flushed and before offsets are committed (the state-dir checkpoint); ``relink``
        gets the logs that came for an already decided trace; ``between_polls`` runs after
        each poll's records are taken in (a group member's turn to talk to its judge)."""
        self.config = config
        self.consume = config.consume
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.tracker = tracker
        self.clock = clock
        self.producer = producer
        self._on_commit = on_commit
        self._relink = relink
        self._between_polls = between_polls
        self._stages = StageAttributes(config.decode.max_stages)
        self._buffers: dict[TopicPartition, deque[_Record]] = {}
        self._paused_full: set[TopicPartition] = set()
        self._backpressure = False
        # True between an assignment and the next revocation: mid-rebalance this member
        # owns nothing yet, which must not read as "caught up".
        self._assigned = False
        self._end_at_start: dict[TopicPartition, int] = {}
        # partition → {trace id: last offset} of traces decided before this member read it
        self._skip: dict[TopicPartition, dict[bytes, int]] = {}
        self._topics = [t for t in (self.consume.traces_topic, self.consume.logs_topic) if t]
        # a poll's counts, published to the metrics once per poll: a Prometheus
        # increment takes a lock, and the exporter's records hold a few spans each
        self._records_read: Counter[str] = Counter()  # topic → records
        self._rows_read: Counter[str] = Counter()  # spans/logs → rows, rejected ones included
        self._rows_rejected: Counter[str] = Counter()
        self.consumer = self._connect()
        self.metrics.gauge("traceguard_kafka_assigned_partitions", lambda: len(self._buffers))
        self.metrics.gauge("traceguard_kafka_paused_partitions", lambda: len(self.consumer.paused()))
        self.metrics.gauge("traceguard_kafka_buffered_records", lambda: sum(map(len, self._buffers.values())))

    def _connect(self) -> KafkaConsumer:
        c = self.consume
        consumer = KafkaConsumer(
            bootstrap_servers=c.bootstrap_servers.split(","),
            group_id=c.group,
            client_id=f"traceguard-{c.group}",
            enable_auto_commit=False,
            auto_offset_reset=c.initial_offset,
            max_poll_records=c.max_poll_records,
            max_partition_fetch_bytes=c.max_partition_fetch_bytes,
            fetch_max_bytes=c.fetch_max_bytes,
            receive_message_max_bytes=c.fetch_max_bytes + (1 << 20),
            session_timeout_ms=c.session_timeout // 1_000_000,
            heartbeat_interval_ms=c.heartbeat_interval // 1_000_000,
            # Range gives a member partition i of both topics: with the exporter's
            # trace-id keys (and equal partition counts) a trace's logs come to
            # the member that holds its spans.
            partition_assignment_strategy=[RangePartitionAssignor],
        )
        if c.exit_at_end:
            partitions = [TopicPartition(topic, p) for topic in self._topics
                          for p in sorted(consumer.partitions_for_topic(topic) or ())]
            self._end_at_start = consumer.end_offsets(partitions) if partitions else {}
        consumer.subscribe(self._topics, listener=_Listener(self))
        return consumer

    # -- the loop -------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> bool:
        """Reads until ``should_stop()`` or, with ``exit_at_end``, until caught up.

        Returns:
            whether it ended by catching up (everything read was decided and committed).

        Raises:
            SinkFailed: findings could not be made durable; nothing past them was committed.
        """
        c = self.consume
        next_commit = time.monotonic() + c.commit_interval / 1e9
        caught_up = False
        while not should_stop():
            polled = self.consumer.poll(timeout_ms=c.poll_timeout // 1_000_000)
            for partition, messages in polled.items():
                buffer = self._buffers.get(partition)
                if buffer is None:  # revoked between fetch and now
                    continue
                buffer.extend(self._decode(partition, message) for message in messages)
            self._process()
            if self.clock is None:
                self.pipeline.advance()
            if self._between_polls is not None:
                self._between_polls()
            self._flow_control()
            if c.exit_at_end and self._caught_up():
                caught_up = True
                break
            if time.monotonic() >= next_commit:
                self.commit()
                next_commit = time.monotonic() + c.commit_interval / 1e9
        return caught_up

    def finish(self, caught_up: bool) -> None:
        """Ends the pipeline and commits: after catching up, decides everything in flight
        (the backfill is over); otherwise leaves the undecided to be read again."""
        with sinks_must_flush():
            self.pipeline.close(decide_in_flight=caught_up)  # flushes and closes the sinks
        self.commit(final=caught_up)

    def close(self) -> None:
        self.consumer.close(autocommit=False)

    def traces_partitions(self) -> list[int]:
        """The traces topic's partitions this member holds."""
        return [p.partition for p in self._buffers if p.topic == self.consume.traces_topic]

    # -- decoding and processing ---------------------------------------------
    def _decode(self, partition: TopicPartition, message) -> _Record:
        signal = "traces" if partition.topic == self.consume.traces_topic else "logs"
        where = f"{partition.topic}/{partition.partition}@{message.offset}"
        try:
            decoded = self._decode_value(signal, message.value or b"")
        except DecodeError as exc:
            self._poison(partition, message, str(exc))
            return _Record(signal, where, corrupt=True, partition=partition, offset=message.offset)
        record = _Record(signal, where, decoded.rows, decoded.rejected, decoded.errors, events=decoded.events,
                         partition=partition, offset=message.offset)
        record.head_time = record.event_time()
        return record

    def _decode_value(self, signal: str, value: bytes):
        decode = self.config.decode
        if self.consume.encoding == "otlp_proto":
            if signal == "traces":
                return decode_traces_proto(value, decode, self._stages)
            return decode_logs_proto(value, decode)
        try:
            document = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise DecodeError("not an OTLP/JSON object")
        if signal == "traces":
            return decode_traces_json(document, decode, self._stages)
        return decode_logs_json(document, decode)

    def _poison(self, partition: TopicPartition, message, error: str) -> None:
        self.metrics.inc("traceguard_kafka_poison_records_total", topic=partition.topic)
        log.warning("poison record skipped: %s/%d@%d: %s", partition.topic, partition.partition, message.offset, error)
        dead = self.consume.dead_letter_topic
        if dead and self.producer is not None:
            headers = [("traceguard.error", error.encode()[:1000]), ("traceguard.topic", partition.topic.encode()),
                       ("traceguard.partition", str(partition.partition).encode()),
                       ("traceguard.offset", str(message.offset).encode())]
            self.producer.send(dead, key=message.key, value=message.value, headers=headers)
            self.metrics.inc("traceguard_kafka_dead_letters_total", topic=partition.topic)

    def _process(self) -> None:
        try:
            if self.clock is None:
                self._process_arrival_order()
            else:
                self._process_event_order()
        finally:
            self._publish_counts()

    def _publish_counts(self) -> None:
        inc = self.metrics.inc
        for topic, records in self._records_read.items():
            inc("traceguard_kafka_records_total", records, topic=topic)
        for kind, rows in self._rows_read.items():
            inc(f"traceguard_{kind}_received_total", rows, transport="kafka")
        for kind, rows in self._rows_rejected.items():
            inc(f"traceguard_{kind}_rejected_total", rows, transport="kafka")
        self._records_read.clear()
        self._rows_read.clear()
        self._rows_rejected.clear()

    def _process_event_order(self) -> None:
        """Event time: the partitions merged by their next record's event time."""
        while True:
            best = None
            for partition, buffer in self._buffers.items():
                if buffer:
                    if best is None or buffer[0].head_time < best[0]:
                        best = (buffer[0].head_time, buffer)
                elif not self._drained(partition):
                    return  # wait for this partition: a record older than the others may come
            if best is None:
                return
            self._handle(best[1].popleft())

    def _process_arrival_order(self) -> None:
        """Wall time: records as they come, but none that would not fit in the
        in-flight bound; the rest wait in their buffers, partitions paused."""
        assembler = self.pipeline.assembler
        for buffer in self._buffers.values():
            while buffer:
                if assembler.room() < len(buffer[0].rows) and assembler.spans_in_flight:
                    self._pause_for_room()
                    return
                self._handle(buffer.popleft())

    def _pause_for_room(self) -> None:
        if not self._backpressure:
            self._backpressure = True
            self.metrics.inc("traceguard_kafka_backpressure_pauses_total")
            log.info("in-flight bound reached (%d spans): pausing all partitions",
                     self.pipeline.assembler.spans_in_flight)

    def _drained(self, partition: TopicPartition) -> bool:
        """Read up to its end as far as known; it does not hold the others back."""
        position = self.consumer.position(partition)
        if self.consume.exit_at_end and position >= self._end(partition):
            return True
        highwater = self.consumer.highwater(partition)
        return highwater is not None and position >= highwater

    def _handle(self, record: _Record) -> None:
        partition = record.partition
        self._records_read[partition.topic] += 1
        if record.corrupt:
            self.tracker.track_done(partition, record.offset, self.pipeline.now())
            return
        if record.signal == "traces" and partition in self._skip:
            self._skip_decided(record)
        assembler = self.pipeline.assembler
        trace_ids = {row.trace_id for row in record.rows}
        self.tracker.track_record(partition, record.offset, record.signal, trace_ids, assembler, self.pipeline.now(),
                                  self.config.logs.ttl)
        kind = "spans" if record.signal == "traces" else "logs"
        self._rows_read[kind] += len(record.rows) + record.rejected
        if record.rejected:
            self._rows_rejected[kind] += record.rejected
            log.warning("%s: %d %s rejected: %s", record.where, record.rejected, kind, "; ".join(record.errors))
        if record.signal == "traces":
            self.pipeline.accept_spans(record.rows, record.events)
        else:
            self.pipeline.accept_logs(record.rows)
            if self._relink is not None:
                for trace_id in trace_ids:
                    if assembler.is_decided(trace_id):
                        self._relink(trace_id, self.pipeline.logs.get(trace_id))
        if self.clock is not None:
            self.pipeline.advance()

    def _skip_decided(self, record: _Record) -> None:
        """Drops the rows of traces the partition's previous reader decided (commit metadata)."""
        skip = self._skip[record.partition]
        kept = after_straddlers(record.rows, skip, record.offset)
        if len(kept) != len(record.rows):
            self.metrics.inc("traceguard_kafka_spans_already_decided_total", len(record.rows) - len(kept))
            record.rows = kept
        if record.offset >= max(skip.values()):
            del self._skip[record.partition]

    # -- flow control -----------------------------------------------------------
    def _flow_control(self) -> None:
        c = self.consume
        limit = c.max_buffered_records
        for partition, buffer in self._buffers.items():
            if len(buffer) >= limit and partition not in self._paused_full:
                self._paused_full.add(partition)
            elif len(buffer) <= limit // 2 and partition in self._paused_full:
                self._paused_full.discard(partition)
        if self.clock is None:
            bound = self.config.assembler.max_spans_in_flight
            in_use = self.pipeline.assembler.spans_in_flight
            if not self._backpressure and in_use >= c.pause_at * bound:
                self._pause_for_room()
            elif self._backpressure and in_use <= c.resume_at * bound:
                self._backpressure = False
                log.info("room again (%d spans in flight): resuming", in_use)
        want = set(self._buffers) if self._backpressure else self._paused_full & set(self._buffers)
        paused = self.consumer.paused()
        if want != paused:
            if paused - want:
                self.consumer.resume(*(paused - want))
            if want - paused:
                self.consumer.pause(*(want - paused))

    def _caught_up(self) -> bool:
        if not self._assigned:
            return False
        return all(not self._buffers[p] and self.consumer.position(p) >= self._end(p) for p in self._buffers)

    def _end(self, partition: TopicPartition) -> int:
        """Where ``exit_at_end`` stops reading ``partition``: its end offset at start.
        A partition the metadata read at start did not list (not loaded yet) gets
        its end when first asked, never 0: that read an unread partition as done,
        and the event-time merge then ran ahead of it."""
        end = self._end_at_start.get(partition)
        if end is None:
            end = self._end_at_start[partition] = self.consumer.end_offsets([partition]).get(partition, 0)
        return end

    # -- commits and rebalances ------------------------------------------------------
    def commit(self, partitions=None, final: bool = False) -> None:
        """Flushes the sinks, then commits what is decided (of ``partitions``, default all
        assigned), keeping the last ``late_horizon`` uncommitted unless ``final``.

        Raises:
            SinkFailed: a sink could not flush; nothing is committed.
        """
        with sinks_must_flush():
            if not self.pipeline.closed:
                self.pipeline.flush_sinks()
            if self.producer is not None:
                self.producer.flush()
        self.tracker.expire(self.pipeline.now())
        if self._on_commit is not None:
            self._on_commit()
        offsets = {}
        read_before = None if final else self.pipeline.now() - self.consume.late_horizon
        for partition in (self._buffers if partitions is None else partitions):
            offset = self.tracker.committable(partition, read_before)
            if offset is not None:
                offsets[partition] = OffsetAndMetadata(offset, self._metadata(partition, offset), -1)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance took the partitions; their next owner reads again
            self.metrics.inc("traceguard_kafka_commit_failures_total")
            log.warning("offset commit failed: %s", exc)
            return
        self.metrics.inc("traceguard_kafka_commits_total")
        for partition, meta in offsets.items():
            self.tracker.committed(partition, meta.offset)

    def _metadata(self, partition: TopicPartition, offset: int) -> str:
        """The straddlers of the commit point, for the next reader: [[trace hex, last offset, decided at], ...]."""
        entries = []
        size = 2
        for trace_id, last in self.tracker.straddlers(partition, offset).items():
            entry = [trace_id.hex(), last, self.pipeline.assembler.decided_at(trace_id) or 0]
            size += len(json.dumps(entry)) + 1
            if size > self.consume.commit_metadata_bytes:
                self.metrics.inc("traceguard_kafka_straddlers_unrecorded_total")
                continue
            entries.append(entry)
        return json.dumps(entries, separators=(",", ":")) if entries else ""

    def _read_metadata(self, partition: TopicPartition) -> None:
        """What the partition's previous reader left in its commit (see ``_metadata``)."""
        committed = self.consumer.committed(partition, metadata=True)
        if committed is None or not committed.metadata:
            return
        try:
            entries = [(bytes.fromhex(t), int(last), int(at)) for t, last, at in json.loads(committed.metadata)]
        except (ValueError, TypeError):
            log.warning("%s/%d: unreadable commit metadata ignored", partition.topic, partition.partition)
            return
        for trace_id, _, decided_at in entries:
            self.pipeline.assembler.remember_decided(trace_id, decided_at)
        self._skip[partition] = {trace_id: last for trace_id, last, _ in entries}

    def _revoked(self, partitions) -> None:
        self._assigned = False
        partitions = [p for p in partitions if p in self._buffers]
        if not partitions:
            return
        self.commit(partitions)
        trace_ids: set[bytes] = set()
        for partition in partitions:
            trace_ids |= self.tracker.revoke(partition)
            del self._buffers[partition]
            self._paused_full.discard(partition)
            self._skip.pop(partition, None)
        dropped = self.pipeline.discard(trace_ids)
        self.metrics.inc("traceguard_kafka_traces_dropped_on_revoke_total", dropped)
        if self.clock is not None and not self._buffers:
            self.clock.reset()  # what is read next may be older than what was read so far
            self.pipeline.assembler.restart()
        log.info("partitions revoked: %s (%d undecided traces left to their next owner)",
                 _names(partitions), dropped)

    def _on_assigned(self, partitions) -> None:
        self._assigned = True
        for partition in partitions:
            self._buffers.setdefault(partition, deque())
            if partition.topic == self.consume.traces_topic:
                self._read_metadata(partition)
        self.metrics.inc("traceguard_kafka_rebalances_total")
        log.info("partitions assigned: %s", _names(partitions) or "none")


def _names(partitions) -> str:
    return ", ".join(f"{p.topic}/{p.partition}" for p in sorted(partitions))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_revoked(self, revoked) -> None:
        self._source._revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self._source._on_assigned(assigned)
