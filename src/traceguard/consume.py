"""The Kafka stream-processor front end: topics → pipeline → anomalies topic, store, JSONL.

One process is one member of the consumer group; more processes split the
partitions. ``--state-dir`` keeps the SQLite store, the learned models
(snapshotted every ``snapshot_interval`` and at stop) and the structural
detectors' checkpoint (written at every commit, before the offsets), so a
restarted member judges the re-read records as the one before it would have.
SIGTERM/SIGINT: commit what is decided and leave the group; undecided traces
are read again by the next owner. ``--exit-at-end``: once caught up with the
end offsets seen at start, decide everything and commit all.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
import time

from kafka.errors import KafkaError

from traceguard.assemble import EventTimeClock, WallClock
from traceguard.config import PipelineConfig
from traceguard.group import Forwarder, Judge, create_topics
from traceguard.metrics import Metrics
from traceguard.models import store as model_store
from traceguard.pipeline import Pipeline
from traceguard.sinks import JsonlSink
from traceguard.sinks.kafka import KafkaTopicSink, ordered_producer
from traceguard.sinks.sqlite import SqliteStore
from traceguard.sources.kafka import KafkaSource, SinkFailed, require_stored, sinks_must_flush
from traceguard.sources.kafka_offsets import OffsetTracker

log = logging.getLogger("traceguard.consume")

CHECKPOINT = "checkpoint.json"


class Consumer:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        c = config.consume
        self.state_dir = c.state_dir
        metrics = Metrics()
        self.store = None
        models = None
        sinks = []
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.store = SqliteStore(self.state_dir / "anomalies.sqlite", config.store, metrics)
            metrics.gauge("traceguard_store_backlog", lambda: self.store.backlog)
            metrics.counted("traceguard_store_dropped_total", lambda: self.store.dropped_)
            sinks.append(self.store)
            if model_store.exists(self.state_dir / "models"):
                models = model_store.load(self.state_dir / "models", config.learned)
                log.info("learned state loaded from %s", self.state_dir / "models")
        if c.out is not None:
            sinks.append(JsonlSink.append_to(c.out))
        self.producer = None
        if c.anomalies_topic or c.dead_letter_topic or c.decided_topic:
            self.producer = ordered_producer(c)
        if c.anomalies_topic:
            sinks.append(KafkaTopicSink(self.producer, c.anomalies_topic, metrics))
        self.clock = EventTimeClock(config.assembler.allowed_lateness, config.assembler.max_ahead) if c.time == "event" else None
        self.tracker = OffsetTracker()
        keep_trace = self.store.keep_trace if self.store is not None else None
        on_decided = lambda trace: self.tracker.release(trace.trace_id)  # noqa: E731
        self.judge = self.forwarder = None
        # a decided trace's later logs, linked to its findings in the store (a judge's, in a judged group)
        relink = (functools.partial(self.store.relink, limit=config.logs.max_linked)
                  if self.store is not None else None)
        if c.decided_topic:
            # members only assemble; whichever holds the decided topic detects, into these sinks
            create_topics(config)
            self.forwarder = Forwarder(self.producer, c.decided_topic, c.watermark_step, metrics)
            self.pipeline = Pipeline(config, self.clock or WallClock(), [], metrics, on_decided=on_decided,
                                     forward=self.forwarder)
            self.judge = Judge(config, sinks, metrics, self.producer, keep_trace, models, relink=relink,
                               stored=functools.partial(require_stored, self.store) if self.store is not None else None)
            relink = self.forwarder.relink
        else:
            self.pipeline = Pipeline(config, self.clock or WallClock(), sinks, metrics, models,
                                     on_decided=on_decided, keep_trace=keep_trace)
            self._restore_checkpoint()
        self.source = KafkaSource(config, self.pipeline, self.tracker, self.clock, self.producer,
                                  on_commit=self._checkpoint, relink=relink,
                                  between_polls=self._tell_judge if self.judge is not None else None)
        self._next_snapshot = time.monotonic() + c.snapshot_interval / 1e9

    def _restore_checkpoint(self) -> None:
        if self.state_dir is None or not (self.state_dir / CHECKPOINT).exists():
            return
        try:
            self.pipeline.restore(json.loads((self.state_dir / CHECKPOINT).read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring an unreadable checkpoint %s: %s", self.state_dir / CHECKPOINT, exc)

    def _tell_judge(self) -> None:
        """Between polls (group judging): this member's watermark, and the judge's turn."""
        self.forwarder.watermark(self.pipeline.now(), self.source.traces_partitions())
        self.judge.poll()

    def _checkpoint(self) -> None:
        """Before every commit: the detectors' state, atomically; the store's retention
        and the models when due. (A group's judge snapshots its own state.) Findings
        the store holds back (the disk refuses writes) stop the commit, as a sink that
        cannot flush does: consume ends with an error and reads them again on restart."""
        if self.store is not None:
            require_stored(self.store)
        if self.judge is not None:
            if self.store is not None and self.judge.judging:
                self.store.prune_if_due(self.judge.pipeline.now())
            return
        if self.state_dir is None:
            return
        model_store.write_atomically(self.state_dir / CHECKPOINT, json.dumps(self.pipeline.checkpoint()).encode())
        self.store.prune_if_due(self.pipeline.now())
        if time.monotonic() >= self._next_snapshot:
            self.snapshot()

    def snapshot(self) -> None:
        if self.judge is not None:
            self.judge.snapshot()
        elif self.state_dir is not None:
            model_store.save(self.pipeline.models_for_saving(), self.state_dir / "models")
            self._next_snapshot = time.monotonic() + self.config.consume.snapshot_interval / 1e9

    def _end_group(self, stop: threading.Event) -> None:
        """After this member caught up (``exit_at_end``) and sent its partitions' final
        watermark: as the judge, judging until every member has ended; otherwise waiting
        until the judge has read past that watermark, so the group never ends without one."""
        judge = self.judge
        end = judge.consumer.end_offsets([judge.partition])[judge.partition]
        while not stop.is_set():
            # before polling: the judge that is done leaves, and a poll would take its place
            committed = judge.consumer.committed(judge.partition)
            if not judge.judging and committed is not None and committed >= end:
                return
            judge.poll(self.config.consume.poll_timeout // 1_000_000)
            if judge.judging and judge.done():
                judge.finish()
                return
        judge.hand_over()  # stopped while judging: the next judge starts from here

    def run(self, stop: threading.Event) -> int:
        """Returns the exit status: 0 when stopped or caught up, 1 when findings could not be written."""
        status = 0
        try:
            caught_up = self.source.run(stop.is_set)
            self.source.finish(caught_up)
            if self.judge is not None and caught_up:
                self.forwarder.watermark(self.pipeline.now(), self.source.traces_partitions(), final=True)
                with sinks_must_flush():
                    self.forwarder.flush()
                self.source.close()  # leaves the group now, not after the judge is done
                self._end_group(stop)
            else:
                self.snapshot()
            log.info("%s", "caught up: everything read is decided and committed" if caught_up
                     else "stopped: decided offsets committed")
        except SinkFailed as exc:
            log.error("%s; stopping without committing them (they are read again on restart)", exc)
            status = 1
        finally:
            self.source.close()
            if self.judge is not None:
                self.judge.close()
            if self.producer is not None:
                try:
                    self.producer.close(timeout=5)
                except KafkaError as exc:  # everything was flushed before the commit; only the close failed
                    log.warning("closing the Kafka producer failed: %s", exc)
            if self.store is not None:
                self.store.close()
        return status


def run(config: PipelineConfig) -> tuple[int, Metrics]:
    """``traceguard consume``: the exit status and the metrics for the summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # the client narrates every connection at INFO
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    consumer = Consumer(config)
    http = None
    if config.consume.api_listen:
        from traceguard.api import create_api
        from traceguard.httpd import HttpServers

        http = HttpServers(config.serve.max_connections, config.serve.read_timeout / 1e9, consumer.pipeline.metrics)
        c = config.consume
        port = http.add(create_api(consumer.store, consumer.pipeline.metrics, lambda: not stop.is_set(), token=c.token,
                                   series=(consumer.judge.series if consumer.judge is not None
                                           else consumer.pipeline.series), ui=config.ui),
                        c.api_listen, c.tls_cert, c.tls_key, name="api")
        http.start()
        log.info("API and /metrics on port %d", port)
    c = config.consume
    log.info("consuming %s as group %r from %s (%s, %s time)", ", ".join(t for t in (c.traces_topic, c.logs_topic) if t),
             c.group, c.bootstrap_servers, c.encoding, c.time)
    try:
        return consumer.run(stop), consumer.pipeline.metrics
    finally:
        if http is not None:
            http.stop(5)

