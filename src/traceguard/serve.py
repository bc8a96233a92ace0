"""The live sidecar front end: OTLP receivers → pipeline (wall clock) → SQLite store, API.

Threads: the gRPC server's workers, one asyncio loop running the OTLP/HTTP
and API servers (uvicorn), and a ticker that decides due traces, trims the
write-ahead log and snapshots the learned state. Each snapshot records the
log position it covers and the log is kept from there; on start the log is
replayed from the loaded snapshot's position before the receivers open, so
a crash loses neither an acknowledged span nor what was learned since the
snapshot.
SIGTERM/SIGINT: stop accepting, decide what is in flight, save the models,
close the store, exit 0, all within ``serve.shutdown_timeout``; what is not
decided by then stays in the write-ahead log for the next start.
"""

from __future__ import annotations

import functools
import logging
import signal
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kafka.errors import KafkaError

from traceguard import group
from traceguard.api import create_api
from traceguard.assemble import WallClock
from traceguard.config import PipelineConfig
from traceguard.httpd import HttpServers
from traceguard.metrics import Metrics
from traceguard.models import Models, store as model_store
from traceguard.models.store import ModelFileError
from traceguard.pipeline import Pipeline
from traceguard.sinks import JsonlSink
from traceguard.sinks.kafka import ordered_producer
from traceguard.sinks.sqlite import SqliteStore
from traceguard.sources.forward import Forwarder
from traceguard.sources.kafka import SinkFailed, require_stored
from traceguard.sources.kafka_offsets import OffsetTracker
from traceguard.sources.live import LiveIngest
from traceguard.sources.wal import Checkpoint, WriteAheadLog
from traceguard.sources.otlp_grpc import start_grpc
from traceguard.sources.otlp_http import create_otlp_http

log = logging.getLogger("traceguard.serve")
# in a model snapshot: the write-ahead log position it covers (a replay after a crash starts there)
POSITION = "wal_position.json"


@dataclass
class Bound:
    """The ports actually bound (``:0`` in the config picks free ones)."""

    grpc: int
    http: int
    api: int


class _TimedStore:
    """The store as a sink, timing each finding from its decision to its row."""

    def __init__(self, store: SqliteStore, metrics: Metrics) -> None:
        self._store, self._metrics = store, metrics

    def emit(self, anomaly) -> None:
        self._store.emit(anomaly)
        self._metrics.observe("traceguard_finding_store_seconds", (time.time_ns() - anomaly.detected_at) / 1e9)

    def emit_incident(self, incident) -> None:
        self._store.emit_incident(incident)

    def flush(self) -> None:
        self._store.flush()

    def close(self) -> None:
        """The store itself is closed last, by Server.stop, after the final flush."""


class Server:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        serve = config.serve
        serve.state_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = serve.state_dir / "models"
        models = self._load_models()
        metrics = Metrics()
        self.store = SqliteStore(serve.state_dir / "anomalies.sqlite", config.store, metrics)
        metrics.gauge("traceguard_store_backlog", lambda: self.store.backlog)
        metrics.counted("traceguard_store_dropped_total", lambda: self.store.dropped_)
        sinks = [_TimedStore(self.store, metrics)]
        if serve.jsonl_out is not None:
            sinks.append(JsonlSink.append_to(serve.jsonl_out))
        wal = tracker = None
        if serve.wal:
            wal = WriteAheadLog(serve.state_dir / "wal", max_bytes=serve.wal_max_bytes,
                                segment_bytes=serve.wal_segment_bytes, fsync=serve.wal_fsync, metrics=metrics)
            tracker = OffsetTracker()
        on_decided = (lambda trace: tracker.release(trace.trace_id)) if tracker else None
        c = config.consume
        self.producer = self.judge = member = None
        if c.decided_topic:
            # one judge for the instances behind a load balancer: each only assembles and sends what it
            # decides; whichever holds the decided topic runs every detector, into its own sinks
            group.create_topics(config)
            self.producer = ordered_producer(c)
            member = group.Forwarder(self.producer, c.decided_topic, c.watermark_step, metrics)
            self.pipeline = Pipeline(config, WallClock(), [], metrics, on_decided=on_decided, forward=member)
            self.judge = group.Judge(config, sinks, metrics, self.producer, self.store.keep_trace, models,
                                     wall_delay=c.judge_delay,
                                     relink=functools.partial(self.store.relink, limit=config.logs.max_linked),
                                     stored=functools.partial(require_stored, self.store))
        else:
            self.pipeline = Pipeline(config, WallClock(), sinks, metrics, models, on_decided=on_decided,
                                     keep_trace=self.store.keep_trace)
        self.forwarder = (Forwarder(serve.forward_to, self.pipeline.metrics, serve.forward_queue)
                          if serve.forward_to else None)
        self._member = member
        self.ingest = LiveIngest(self.pipeline, self.store, config, self.forwarder, wal, tracker,
                                 relink=member.relink if member is not None else None)
        self._covered: int | None = None  # the log position the last model snapshot covers
        if wal is not None:
            replayed = self.ingest.recover(self._loaded_position())
            if replayed:
                log.info("write-ahead log: %d requests accepted before the last stop taken again", replayed)
            self.snapshot()  # from now on the log is kept from a position a snapshot covers
        self._ready = False
        self._stopping = threading.Event()
        self._http = HttpServers(config.serve.max_connections, config.serve.read_timeout / 1e9, self.pipeline.metrics)
        self._ticker: threading.Thread | None = None
        self._judging: threading.Thread | None = None
        self._grpc = None
        self.bound: Bound | None = None

    def ready(self) -> bool:
        """Taking exports: started, not stopping, and the store and the write-ahead log write
        (and, in a group, the decided traces reach the judge's topic: a member that cannot
        send them is taken out of the load balancer's rotation until it is restarted)."""
        wal = self.ingest.wal
        return (self._ready and not self._stopping.is_set() and self.store.failing is None
                and (wal is None or wal.failing is None) and (self._member is None or self._member.failing is None))

    def _loaded_position(self) -> Checkpoint | None:
        """The log position the state dir's snapshot covers (None: it has none; the log's
        own checkpoint is used, which does not bring back what was learned since)."""
        try:
            data = model_store.extra(self.model_dir, POSITION)
            return Checkpoint.from_json(data) if data is not None else None
        except (ModelFileError, ValueError, TypeError, KeyError) as exc:
            log.error("the snapshot's write-ahead log position is unusable (%s): replaying from the log's "
                      "checkpoint", exc)
            return None

    def _load_models(self) -> Models | None:
        """The state dir's own snapshot (a restart), else the trained ``serve.model_dir``."""
        for directory in (self.model_dir, self.config.serve.model_dir):
            if directory is not None and model_store.exists(directory):
                models = model_store.load(directory, self.config.learned)
                log.info("learned state loaded from %s", directory)
                return models
        return None

    def start(self) -> Bound:
        serve = self.config.serve
        tls = None
        if serve.tls_cert is not None:
            tls = (serve.tls_key.read_bytes(), serve.tls_cert.read_bytes())
            try:  # a bad pair is said plainly here, not as grpc's "Failed to bind"
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(serve.tls_cert, serve.tls_key)
            except ssl.SSLError as exc:
                raise RuntimeError(f"serve.tls_cert and serve.tls_key cannot be used together: {exc}") from None
        # Bind the HTTP sockets first, so an address in use fails now, plainly.
        otlp_http = create_otlp_http(self.ingest, max_request_bytes=serve.max_request_bytes, token=serve.token,
                                     read_timeout_s=serve.read_timeout / 1e9, max_receiving_bytes=serve.max_receiving_bytes)
        api = create_api(self.store, self.pipeline.metrics, self.ready, token=serve.token,
                         series=self.judge.series if self.judge is not None else self.pipeline.series,
                         ui=self.config.ui)
        http_port = self._http.add(otlp_http, serve.http_listen, serve.tls_cert, serve.tls_key, name="otlp_http")
        api_port = self._http.add(api, serve.api_listen, serve.tls_cert, serve.tls_key, name="api")
        try:
            self._grpc, grpc_port = start_grpc(self.ingest, serve.grpc_listen,
                                               max_request_bytes=serve.max_request_bytes, token=serve.token, tls=tls)
        except Exception:
            self._http.stop(0)
            raise
        self._http.start()
        self._ticker = threading.Thread(target=self._tick, name="ticker", daemon=True)
        self._ticker.start()
        if self.judge is not None:
            self._judging = threading.Thread(target=self._judge, name="judge", daemon=True)
            self._judging.start()
        self.bound = Bound(grpc_port, http_port, api_port)
        self._ready = True
        return self.bound

    def _tick(self) -> None:
        serve = self.config.serve
        wal = self.ingest.wal
        next_snapshot = time.monotonic() + serve.snapshot_interval / 1e9
        next_commit = time.monotonic() + serve.wal_commit_interval / 1e9
        while not self._stopping.wait(serve.tick / 1e9):
            try:
                self.ingest.tick()
                self.store.prune_if_due(time.time_ns())
                if wal is not None and time.monotonic() >= next_commit:
                    self.ingest.commit_log(self._covered)
                    next_commit = time.monotonic() + serve.wal_commit_interval / 1e9
                # Due by time, or early when the log kept for the last snapshot fills half its bound.
                due = time.monotonic() >= next_snapshot or (wal is not None and wal.size > serve.wal_max_bytes / 2)
                if due and self.snapshot(when_settled=True):
                    next_snapshot = time.monotonic() + serve.snapshot_interval / 1e9
            except Exception:  # the ticker must outlive one bad tick; the error is logged and counted
                log.exception("tick failed")
                self.pipeline.metrics.inc("traceguard_tick_errors_total")

    def _judge(self) -> None:
        """The group's judge, while this instance holds the decided topic: its own thread,
        whose consumer only it touches, so judging never holds up the receivers' decisions."""
        timeout_ms = self.config.consume.poll_timeout // 1_000_000
        while not self._stopping.is_set():
            try:
                self.judge.poll(timeout_ms)
            except Exception:  # as the ticker: one bad poll must not end judging
                log.exception("judging failed")
                self.pipeline.metrics.inc("traceguard_tick_errors_total")
                self._stopping.wait(timeout_ms / 1000)

    def snapshot(self, when_settled: bool = False) -> bool:
        """Saves the learned state with the write-ahead log position it covers, so that
        after a crash the log replays exactly what it lacks. ``when_settled``: not
        while the forest holds decided traces for its batch (it scores at least every
        ``learned.forest.max_delay``); returns whether it saved."""
        with self.ingest.lock:
            if when_settled and self.pipeline.batched():
                return False
            self._save_locked()
        return True

    def _save_locked(self) -> None:
        """The models (and the log position they cover), under the ingest lock."""
        extras = {}
        if self.ingest.wal is not None:
            position = self.ingest.position()
            extras[POSITION] = position.to_json()
        model_store.save(self.pipeline.models_for_saving(), self.model_dir, extras)
        if self.ingest.wal is not None:
            self._covered = position.seq

    def _stop_judging(self, deadline: float) -> None:
        """The judge saves its state for the next one (which reads on from the oldest
        trace it still held) and leaves the group, before the store closes."""
        if self._judging is not None:
            self._judging.join(max(0.0, deadline - time.monotonic()))
        try:
            self.judge.hand_over()
        except (KafkaError, OSError, SinkFailed) as exc:  # the next judge starts from the last snapshot written
            log.error("the judge's state could not be saved: %s", exc)
        self.judge.close()

    def stop(self) -> None:
        """Stops accepting, decides what is in flight, saves the models and closes the
        store, all within ``serve.shutdown_timeout`` (the kubelet kills after its grace
        period): the receivers get a tenth of it, deciding runs until three quarters
        of it are gone, and what is still undecided then is left to the write-ahead
        log's replay at the next start (lost without the log) and counted
        (``traceguard_traces_abandoned_total``); the rest is for the models and the
        store. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        timeout = self.config.serve.shutdown_timeout / 1e9
        started = time.monotonic()
        if self._grpc is not None:
            self._grpc.stop(grace=timeout / 20).wait(timeout / 10)
        self._http.stop(max(0.0, started + timeout / 10 - time.monotonic()))
        if self._ticker is not None:
            self._ticker.join(max(0.0, started + timeout / 5 - time.monotonic()))
        if self.forwarder is not None:
            self.forwarder.close(max(0.0, started + timeout / 4 - time.monotonic()))
        with self.ingest.lock:
            abandoned = self.pipeline.close(deadline=started + timeout * 3 / 4)
            if abandoned:
                log.warning("%d traces in flight were not decided within serve.shutdown_timeout (%g s); %s",
                            abandoned, timeout, "the write-ahead log replays them at the next start"
                            if self.ingest.wal is not None else "they are lost")
            try:
                self._save_locked()
            except OSError as exc:  # a full disk: the snapshot before stays whole (saves are atomic)
                log.error("the learned state could not be saved: %s", exc)
        if self.judge is not None:
            self._stop_judging(started + timeout * 7 / 8)
        self.store.close()
        if self.ingest.wal is not None:
            # what was decided is trimmed; the undecided rest is replayed next start
            self.ingest.commit_log(self._covered)
            self.ingest.wal.close()
        if self.producer is not None:
            try:
                self.producer.close(timeout=max(0.0, started + timeout - time.monotonic()))
            except KafkaError as exc:  # what the log was trimmed for is acknowledged already
                log.warning("closing the Kafka producer failed: %s", exc)
        if self.store.backlog or self.store.dropped_:
            log.error("%d findings could not be written to the store (%s) and are lost",
                      self.store.backlog + self.store.dropped_, self.store.failing)


def run(config: PipelineConfig) -> int:
    """``traceguard serve``: runs until SIGTERM/SIGINT, then stops cleanly."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # with a decided topic: the client narrates at INFO
    server = Server(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    bound = server.start()
    log.info("listening: OTLP/gRPC :%d, OTLP/HTTP :%d, API :%d, state in %s",
             bound.grpc, bound.http, bound.api, Path(config.serve.state_dir).resolve())
    stop.wait()
    log.info("stopping")
    server.stop()
    log.info("stopped")
    return 0
