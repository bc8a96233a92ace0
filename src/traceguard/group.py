"""One judge for a consumer group: the learned detectors and incidents see the whole traffic once.

Traces are partitioned by trace id, which is right for assembling them; but
all detectors but three structural ones learn from what they see (latency
baselines, error rates, the pairing history, the expected structure, the
forest, the burst rates), so members that each learn from their share
disagree: one regression becomes a finding per member with other onsets, or
none where no share crosses a threshold (``benchmarks/group_split.py``).

With ``consume.decided_topic`` a member only decodes and assembles. It sends
each trace it decides (spans, logs, decision time) and each late span to that
topic's one partition, and every ``watermark_step`` its clock with the traces
partitions it holds. The member that holds the partition (a second group,
``<group>.judge``, sticky, so the role stays put while members come and go)
takes the traces in decision-time order up to the watermark every traces
partition has passed and runs one pipeline's detectors on them: the input a
single consumer's detectors would have had, so its findings and incidents.

The judge snapshots its state (models, checkpoint, watermarks, the traces it
judged lately) to the compacted ``<topic>_state`` every ``snapshot_interval``
with the offset to read again from; a member that takes the partition over
(the judge was killed or left) restores it and reads on, so its findings and
incidents carry the same deterministic ids. A trace a member decides again
after a crash or rebalance is judged once, by trace id; one whose decision time
the judge has passed already (its member's clock started over) is judged at once
and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import io
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import orjson
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from traceguard.assemble import SetClock
from traceguard.assemble.assembler import expand_rows
from traceguard.config import PipelineConfig
from traceguard.metrics import Metrics
from traceguard.models import Models, store as model_store
from traceguard.models.series import StageSeries
from traceguard.pipeline import Pipeline
from traceguard.records import FLAG_HAS_LINKS, NO_PARENT, SPAN_CORE, Anomaly, LogRow, SpanRow, Trace
from traceguard.sinks import Sink
from traceguard.sinks.kafka import TopicWriter
from traceguard.sources.kafka import sinks_must_flush

log = logging.getLogger("traceguard.group")

_NEVER = 1 << 63  # the watermark of a partition whose member has ended
_STATE_KEY = b"judge"  # the last whole snapshot: which slot holds it, in how many chunks, its digest
# A snapshot is written in chunks (under the broker's default message size) to the slot the
# last one is not in: a judge killed while writing leaves the last whole one readable.
_CHUNK = 512 << 10
_SLOTS = ("a", "b")


class BadRecord(ValueError):
    """A record of the decided topic that is not one a member writes."""


# -- the records -----------------------------------------------------------------
def _logs(rows: Sequence[LogRow]) -> list[list]:
    return [[r.span_id.hex() if r.span_id else None, r.time, r.severity_number, r.severity_text, r.body, r.service]
            for r in rows]


def _log_rows(trace_id: bytes, rows: list[list]) -> list[LogRow]:
    return [LogRow(trace_id, bytes.fromhex(span) if span else None, time, number, text, body, service)
            for span, time, number, text, body, service in rows]


def encode_trace(trace: Trace) -> bytes:
    """A decided trace as the judge rebuilds it: each span as the row it was assembled from."""
    spans = [[SPAN_CORE.pack(s.span_id, s.parent_span_id or NO_PARENT, s.start, s.kind, s.status,
                             FLAG_HAS_LINKS if s.has_links else 0).hex(),
              s.end, s.service, s.name, s.attrs, s.instance] for s in trace.spans]
    return orjson.dumps({"trace": trace.trace_id.hex(), "reason": trace.reason, "decided_at": trace.decided_at,
                         "first_seen": trace.first_seen, "spans": spans, "logs": _logs(trace.logs)})


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def decode_trace(document: dict) -> Trace:
    trace_id = bytes.fromhex(document["trace"])
    intern = sys.intern
    rows = [SpanRow(trace_id, bytes.fromhex(core), end, intern(service), intern(name),
                    tuple((k, _frozen(v)) for k, v in attrs) if attrs else None, instance)
            for core, end, service, name, attrs, instance in document["spans"]]
    if any(len(row.core) != SPAN_CORE.size for row in rows):
        raise BadRecord("a span row of the wrong length")
    spans, by_id, children, orphans, _, root, stages, failed = expand_rows(rows)
    trace = Trace(trace_id, spans, by_id, children, orphans, root, document["reason"], document["decided_at"],
                  document["first_seen"])
    trace.derived["stages"] = stages
    trace.derived["failed"] = failed
    trace.logs = _log_rows(trace_id, document["logs"])
    return trace


class Forwarder:
    """A member's side (``Pipeline``'s ``forward``): what it decided, to the judge's partition."""

    def __init__(self, producer: KafkaProducer, topic: str, step: int, metrics: Metrics) -> None:
        self._writer = TopicWriter(producer, topic, metrics, "decided traces")
        self._step = step
        self._metrics = metrics
        self._sent_at: int | None = None
        self._sent_for: tuple[int, ...] = ()

    def trace(self, trace: Trace) -> None:
        self._writer.send(trace.trace_id, encode_trace(trace), partition=0)
        self._metrics.inc("traceguard_group_traces_forwarded_total")

    def late(self, anomaly: Anomaly, logs: list[LogRow]) -> None:
        self._writer.send(bytes.fromhex(anomaly.trace_id),
                          orjson.dumps({"late": anomaly.model_dump(mode="json"), "logs": _logs(logs)}), partition=0)

    def relink(self, trace_id: bytes, logs: list[LogRow]) -> None:
        """Logs that came after their trace was decided (all the trace's logs this member
        holds): the judge links them to the trace's findings in its store."""
        self._writer.send(trace_id, orjson.dumps({"relink": trace_id.hex(), "logs": _logs(logs)}), partition=0)

    def watermark(self, now: int, partitions: Sequence[int], final: bool = False) -> None:
        """Tells the judge that nothing this member decides for ``partitions`` from now on
        was decided at or before ``now``; sent when it moved by a step, or changed hands."""
        partitions = tuple(sorted(partitions))
        if not partitions or not (final or partitions != self._sent_for or self._sent_at is None
                                  or now >= self._sent_at + self._step):
            return
        self._sent_at, self._sent_for = now, partitions
        self._writer.send(b"", orjson.dumps({"watermark": now, "partitions": partitions, "final": final}),
                          partition=0)

    @property
    def failing(self) -> Exception | None:
        """Why a record did not reach the judge's topic (None: none failed)."""
        return self._writer.failing

    def flush(self) -> None:
        """Raises:
            OSError: a record did not reach the judge's topic (the source commits nothing past it).
        """
        self._writer.flush()


def create_topics(config: PipelineConfig) -> None:
    """The decided topic (one partition: one judge reads it in order; a record as large as
    the consumer fetches, for a trace of many spans) and its compacted state topic, if missing."""
    c = config.consume
    size = str(c.fetch_max_bytes)
    admin = KafkaAdminClient(bootstrap_servers=c.bootstrap_servers.split(","), client_id=f"traceguard-{c.group}")
    try:
        for topic, configs in ((c.decided_topic, {"max.message.bytes": size}),
                               (f"{c.decided_topic}_state", {"cleanup.policy": "compact"})):
            with contextlib.suppress(TopicAlreadyExistsError):  # made by another member, or by hand
                admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    finally:
        admin.close()


# -- the judge -------------------------------------------------------------------
class Judge:
    """The decided topic's reader; it judges while this member holds the partition."""

    def __init__(self, config: PipelineConfig, sinks: Sequence[Sink], metrics: Metrics, producer: KafkaProducer,
                 keep_trace: Callable[[Trace, bool], None] | None = None, models: Models | None = None,
                 wall_delay: int | None = None,
                 relink: Callable[[bytes, list[LogRow]], None] | None = None,
                 stored: Callable[[], None] | None = None) -> None:
        """``models``: what a judge starts from when the group has no state yet (trained
        models). ``wall_delay``: the members are ``serve`` instances, which decide on the
        wall clock they all share and send no watermarks: a trace is taken once this
        judge's wall clock is that far past its decision. ``relink``: links a judged
        trace's logs that came after its decision to its stored findings. ``stored``:
        raises ``SinkFailed`` while the findings store holds findings back
        (``require_stored``); no snapshot is taken then, since the next judge would start
        past those findings."""
        self.config = config
        c = config.consume
        self._sinks = sinks
        self._metrics = metrics
        self._producer = producer
        self._keep_trace = keep_trace
        self._start_models = models
        self._wall_delay = wall_delay
        self._relink = relink
        self._stored = stored
        self.partition = TopicPartition(c.decided_topic, 0)
        self._state_topic = f"{c.decided_topic}_state"
        self.pipeline: Pipeline | None = None  # while this member is the judge
        # the stage pages' windows, behind this member's API whichever pipeline judges
        self.series = StageSeries(config.ui.series_windows, config.ui.series_stages)
        self._reset()
        self._traces_partitions = 0
        self._slot: str | None = None  # where the last snapshot is
        self.consumer = KafkaConsumer(
            bootstrap_servers=c.bootstrap_servers.split(","), group_id=f"{c.group}.judge",
            client_id=f"traceguard-{c.group}-judge", enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=c.max_poll_records, max_partition_fetch_bytes=c.fetch_max_bytes,
            fetch_max_bytes=c.fetch_max_bytes, receive_message_max_bytes=c.fetch_max_bytes + (1 << 20),
            session_timeout_ms=c.session_timeout // 1_000_000, heartbeat_interval_ms=c.heartbeat_interval // 1_000_000,
            partition_assignment_strategy=[StickyPartitionAssignor])
        self.consumer.subscribe([c.decided_topic], listener=_Listener(self))
        metrics.gauge("traceguard_group_judging", lambda: 1 if self.pipeline is not None else 0)
        metrics.gauge("traceguard_group_traces_waiting", lambda: len(self._waiting))

    def _reset(self) -> None:
        self._watermarks: dict[int, int] = {}
        self._final_time = 0
        self._waiting: list[tuple[int, bytes, int, Trace]] = []  # (decided at, trace id, offset, trace): a heap
        self._waiting_by_id: dict[bytes, Trace] = {}
        self._judged: dict[bytes, int] = {}  # trace id → decided at, for the late horizon
        self._next = 0  # the offset to read next
        self._late_from = 0  # late-span records below it were judged before the snapshot
        self._prune_at = 1 << 16
        self._snapshot_at = time.monotonic() + self.config.consume.snapshot_interval / 1e9

    @property
    def judging(self) -> bool:
        return self.pipeline is not None

    # -- reading ----------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0) -> None:
        """Reads what came and judges what the members' watermark allows, at most
        ``max_poll_records`` traces a call: a judge far behind must still poll its
        consumers (and its member's) within max.poll.interval.ms, or the group takes
        its partitions away; a call with traces left to judge does not wait."""
        if self._due():
            timeout_ms = 0
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        if self.pipeline is None:
            return
        for messages in polled.values():
            for message in messages:
                self._read(message)
        self._release(self.config.consume.max_poll_records)

    def _due(self) -> bool:
        waiting = self._waiting
        return self.pipeline is not None and bool(waiting) and (
            waiting[0][0] <= self._horizon() or len(waiting) > self.config.consume.judge_max_waiting)

    def _read(self, message) -> None:
        self._next = message.offset + 1
        try:
            document = orjson.loads(message.value)
            if "trace" in document:
                self._take(document, message.offset)
            elif "watermark" in document:
                self._watermark(document)
            elif "relink" in document:
                trace_id = bytes.fromhex(document["relink"])
                # below _late_from they were linked before the snapshot, unless the trace still waits
                if message.offset >= self._late_from or trace_id in self._waiting_by_id:
                    self._logs_after(trace_id, document["logs"])
            elif "late" in document:
                if message.offset >= self._late_from:
                    trace_id = bytes.fromhex(document["late"]["trace_id"])
                    self.pipeline.judge_late(Anomaly.model_validate(document["late"]),
                                             _log_rows(trace_id, document["logs"]))
            else:
                raise BadRecord("neither a trace, a late span, late logs nor a watermark")
        except (orjson.JSONDecodeError, BadRecord, KeyError, TypeError, ValueError) as exc:
            self._metrics.inc("traceguard_kafka_poison_records_total", topic=self.partition.topic)
            log.warning("poison record skipped: %s/0@%d: %s", self.partition.topic, message.offset, exc)

    def _take(self, document: dict, offset: int) -> None:
        trace_id = bytes.fromhex(document["trace"])
        if trace_id in self._judged or trace_id in self._waiting_by_id:
            self._metrics.inc("traceguard_group_traces_judged_before_total")
            return
        trace = decode_trace(document)
        if trace.decided_at <= self._clock.now():
            # its member's clock started over (a rebalance or a crash): too late for its place in order
            self._metrics.inc("traceguard_group_traces_out_of_order_total")
            self._judge(trace)
            self.pipeline.advance_detectors()
            return
        heapq.heappush(self._waiting, (trace.decided_at, trace_id, offset, trace))
        self._waiting_by_id[trace_id] = trace

    def _logs_after(self, trace_id: bytes, logs: list[list]) -> None:
        """A member's logs of a trace it decided: the waiting trace is judged with them;
        a judged one's findings get them in the store."""
        rows = _log_rows(trace_id, logs)
        waiting = self._waiting_by_id.get(trace_id)
        if waiting is not None:
            waiting.logs = rows
        elif self._relink is not None and trace_id in self._judged:
            self._relink(trace_id, rows)

    def _watermark(self, document: dict) -> None:
        now = int(document["watermark"])
        for partition in document["partitions"]:
            value = _NEVER if document["final"] else now
            if value > self._watermarks.get(int(partition), 0):
                self._watermarks[int(partition)] = value
        if document["final"]:
            self._final_time = max(self._final_time, now)

    def _horizon(self) -> int:
        """The time every traces partition's member has passed (0 until each has reported)."""
        if self._wall_delay is not None:
            return time.time_ns() - self._wall_delay
        if not self._traces_partitions:
            self._traces_partitions = len(self.consumer.partitions_for_topic(self.config.consume.traces_topic) or ())
            if not self._traces_partitions:
                return 0
        return min(self._watermarks.get(p, 0) for p in range(self._traces_partitions))

    def _release(self, limit: int) -> None:
        """Judges the waiting traces the horizon has passed, oldest first, about ``limit``
        of them (whole decision times). Past ``judge_max_waiting`` the oldest are judged
        before the horizon passes them (a member far behind the others holds it back),
        as the assembler decides the oldest early at its bounds, and counted."""
        horizon = self._horizon()
        waiting = self._waiting
        bound = self.config.consume.judge_max_waiting
        judged = 0
        while waiting and judged < limit and (waiting[0][0] <= horizon or len(waiting) > bound):
            decided_at = waiting[0][0]
            early = decided_at > horizon
            self._clock.set(decided_at)
            while waiting and waiting[0][0] == decided_at:
                _, trace_id, _, trace = heapq.heappop(waiting)
                del self._waiting_by_id[trace_id]
                self._judge(trace)
                judged += 1
                if early:
                    self._metrics.inc("traceguard_group_traces_judged_early_total")
            self.pipeline.advance_detectors()
            if time.monotonic() >= self._snapshot_at and not self.pipeline.batched():
                self.snapshot()
        if self._clock.now() < horizon < _NEVER and not self._due():
            self._clock.set(horizon)
            self.pipeline.advance_detectors()

    def _judge(self, trace: Trace) -> None:
        self._judged[trace.trace_id] = trace.decided_at
        self.pipeline.judge(trace)
        self._metrics.inc("traceguard_group_traces_judged_total")
        if len(self._judged) >= self._prune_at:
            keep_from = self._clock.now() - self.config.consume.late_horizon
            self._judged = {t: at for t, at in self._judged.items() if at >= keep_from}
            self._prune_at = max(1 << 16, 2 * len(self._judged))

    def done(self) -> bool:
        """Every traces partition's member has ended and everything it sent is judged."""
        return (self.pipeline is not None and not self._waiting and self._horizon() == _NEVER)

    def finish(self) -> None:
        """The group has ended (``exit_at_end``): the detectors settle at the last member's
        time, the state is saved and the partition committed to its end."""
        self._clock.set(self._final_time)
        with sinks_must_flush():
            self.pipeline.close(decide_in_flight=True)  # flushes and closes the sinks
        self.snapshot()

    # -- state ------------------------------------------------------------------------
    def hand_over(self) -> None:
        """This member stops while judging: the forest scores what it holds for its batch
        (its verdicts would be lost with this judge; a batch boundary one process would not
        have), then the state is saved for the next judge."""
        if self.pipeline is not None and not self.pipeline.closed:
            self.pipeline.score_batches()
        self.snapshot()

    def snapshot(self) -> None:
        """Saves the state to the state topic, then commits where a next judge reads from.
        Taken every ``snapshot_interval`` between two decision times when the forest holds
        no trace for its batch (the state would not hold them), and when this member stops.

        Raises:
            SinkFailed: findings judged so far are not durable; no state is saved past them.
        """
        if self.pipeline is None:
            return
        self._snapshot_at = time.monotonic() + self.config.consume.snapshot_interval / 1e9
        with sinks_must_flush():
            if not self.pipeline.closed:
                self.pipeline.flush_sinks()
        if self._stored is not None:
            self._stored()
        read_from = min((offset for _, _, offset, _ in self._waiting), default=self._next)
        ledger = {"read_from": read_from, "next": self._next, "now": self._clock.now(),
                  "final_time": self._final_time, "watermarks": list(self._watermarks.items()),
                  "judged": [[t.hex(), at] for t, at in self._judged.items()]}
        buffer = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            model_store.save(self.pipeline.models_for_saving(), Path(tmp) / "models")
            (Path(tmp) / "checkpoint.json").write_bytes(orjson.dumps(self.pipeline.checkpoint()))
            (Path(tmp) / "judge.json").write_bytes(orjson.dumps(ledger))
            tar.add(tmp, arcname="state")
        blob = buffer.getvalue()
        slot = _SLOTS[(_SLOTS.index(self._slot) + 1) % len(_SLOTS)] if self._slot else _SLOTS[0]
        chunks = [blob[i:i + _CHUNK] for i in range(0, len(blob), _CHUNK)] or [b""]
        for i, chunk in enumerate(chunks):
            self._producer.send(self._state_topic, key=f"judge/{slot}/{i}".encode(), value=chunk, partition=0)
        header = {"slot": slot, "chunks": len(chunks), "sha256": hashlib.sha256(blob).hexdigest()}
        self._producer.send(self._state_topic, key=_STATE_KEY, value=orjson.dumps(header), partition=0).get(timeout=120)
        self._slot = slot
        self._metrics.inc("traceguard_group_snapshots_total")
        try:  # the snapshot holds the offset; the commit shows the group's progress to Kafka's tools
            self.consumer.commit({self.partition: OffsetAndMetadata(read_from, "", -1)})
        except KafkaError as exc:
            log.warning("committing the judge's offset failed (the snapshot holds it): %s", exc)

    def _take_over(self) -> None:
        """This member now holds the partition: the last judge's state, or a fresh one."""
        self._reset()
        self._clock = SetClock(deterministic=self._wall_delay is None and self.config.consume.time == "event")
        try:
            blob = self._last_state()
        except BadRecord as exc:  # not expected: a snapshot is written whole before it is named
            log.error("%s: judging without it", exc)
            blob = None
        models, checkpoint = self._start_models, None
        with tempfile.TemporaryDirectory() as tmp:
            if blob is not None:
                with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
                    tar.extractall(tmp, filter="data")
                state = Path(tmp) / "state"
                models = model_store.load(state / "models", self.config.learned)
                checkpoint = orjson.loads((state / "checkpoint.json").read_bytes())
                ledger = orjson.loads((state / "judge.json").read_bytes())
        self.series.clear()
        self.pipeline = Pipeline(self.config, self._clock, self._sinks, self._metrics, models,
                                 keep_trace=self._keep_trace, judging=True, series=self.series)
        if blob is None:
            self.consumer.seek(self.partition, 0)
            log.info("judging the group from the start of %s", self.partition.topic)
            return
        self.pipeline.restore(checkpoint)
        self._clock.set(ledger["now"])
        self._final_time = ledger["final_time"]
        self._watermarks = {int(p): w for p, w in ledger["watermarks"]}
        self._judged = {bytes.fromhex(t): at for t, at in ledger["judged"]}
        self._next = self._late_from = ledger["next"]
        self.consumer.seek(self.partition, ledger["read_from"])
        log.info("judging the group from the last judge's state (%s/0@%d)", self.partition.topic, ledger["read_from"])

    def _last_state(self) -> bytes | None:
        c = self.config.consume
        reader = KafkaConsumer(bootstrap_servers=c.bootstrap_servers.split(","), enable_auto_commit=False,
                               max_partition_fetch_bytes=c.fetch_max_bytes, fetch_max_bytes=c.fetch_max_bytes,
                               receive_message_max_bytes=c.fetch_max_bytes + (1 << 20))
        try:
            partition = TopicPartition(self._state_topic, 0)
            reader.assign([partition])
            reader.seek_to_beginning(partition)
            end = reader.end_offsets([partition])[partition]
            last: dict[bytes, bytes] = {}
            while reader.position(partition) < end:
                for messages in reader.poll(timeout_ms=1000).values():
                    for message in messages:
                        if message.key is not None and message.value is not None:
                            last[message.key] = message.value
        finally:
            reader.close()
        if _STATE_KEY not in last:
            return None
        try:
            header = orjson.loads(last[_STATE_KEY])
            self._slot = header["slot"]
            blob = b"".join(last[f"judge/{header['slot']}/{i}".encode()] for i in range(int(header["chunks"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BadRecord(f"the last judge state in {self._state_topic} is incomplete: {exc}") from None
        if hashlib.sha256(blob).hexdigest() != header["sha256"]:
            raise BadRecord(f"the last judge state in {self._state_topic} does not match its digest")
        return blob

    def _lost(self) -> None:
        if self.pipeline is not None:
            try:
                self.pipeline.flush_sinks()
            except (KafkaError, OSError) as exc:
                log.warning("flushing the judge's findings at handover failed: %s", exc)
            self.pipeline = None
            log.info("no longer the group's judge")

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class _Listener(ConsumerRebalanceListener):
    """Eager rebalances revoke everything and assign again: the judge keeps its state
    through one that gives it the partition back, and reads on from where it was."""

    def __init__(self, judge: Judge) -> None:
        self._judge = judge

    def on_partitions_revoked(self, revoked) -> None:
        """Nothing yet: whether the partition is lost is known at the assignment."""

    def on_partitions_assigned(self, assigned) -> None:
        judge = self._judge
        if judge.partition not in assigned:
            judge._lost()
        elif judge.pipeline is None:
            judge._take_over()
        else:
            judge.consumer.seek(judge.partition, judge._next)
