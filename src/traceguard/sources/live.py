"""The edge both live OTLP receivers share: decode, check the bounds, log, hand over.

Decoding runs on the receiver's thread; everything that touches the pipeline
runs under one lock, so gRPC workers, the HTTP loop and the ticker never see
a half-updated assembler. At the in-flight bound a request is refused whole
(``Overloaded``): the client retries after ``retry_after`` instead of this
process growing, and nothing it sent is half accepted. An accepted request is
in the write-ahead log (``wal``) before it is answered; which of its records
are still needed is tracked as the Kafka source tracks offsets.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Callable, Iterator

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from traceguard.config import DecodeConfig, PipelineConfig
from traceguard.decode import Decoded, DecodeError, decode_logs_json, decode_logs_proto, decode_traces_json, decode_traces_proto
from traceguard.decode.common import StageAttributes
from traceguard.pipeline import Pipeline
from traceguard.records import LogRow
from traceguard.sinks.sqlite import SqliteStore
from traceguard.sources.forward import Forwarder
from traceguard.sources.kafka_offsets import OffsetTracker, after_straddlers
from traceguard.sources.wal import Checkpoint, WalFull, WriteAheadLog

WAL = "wal"  # the tracker's one partition


def decode_body(signal: str, encoding: str, body: bytes, config: DecodeConfig,
                stages: StageAttributes) -> tuple[Decoded, dict | None]:
    """An export request's body (``proto`` or ``json``) → its rows, and the parsed JSON document if any.

    Raises:
        DecodeError: not the encoding it claims.
    """
    document = None
    if encoding == "json":
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"invalid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise DecodeError(f"the top level is {type(document).__name__}, not an object")
    if signal == "traces":
        decoded = decode_traces_json(document, config, stages) if document is not None else decode_traces_proto(body, config, stages)
    else:
        decoded = decode_logs_json(document, config) if document is not None else decode_logs_proto(body, config)
    return decoded, document


def export_response(signal: str, rejected: int, message: str):
    """The OTLP answer to an accepted export: empty, or partial success with the rejects."""
    if signal == "traces":
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
    else:
        response = ExportLogsServiceResponse()
        if rejected:
            response.partial_success.rejected_log_records = rejected
    if rejected:
        response.partial_success.error_message = message
    return response


class Overloaded(Exception):
    """The in-flight bound is reached; the client should retry later."""

    def __init__(self, retry_after_s: float, why: str = "it is at its in-flight bound") -> None:
        super().__init__(f"traceguard cannot take this now: {why}; retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class LiveIngest:
    def __init__(self, pipeline: Pipeline, store: SqliteStore, config: PipelineConfig,
                 forwarder: Forwarder | None = None, wal: WriteAheadLog | None = None,
                 tracker: OffsetTracker | None = None,
                 relink: Callable[[bytes, list[LogRow]], None] | None = None) -> None:
        """``tracker`` hears of every decided trace (the pipeline's ``on_decided``) when ``wal``
        is on. ``relink`` takes a decided trace's logs when more come (default: linked to its
        findings in ``store``; a group's member sends them to the judge)."""
        self.pipeline = pipeline
        self.forwarder = forwarder
        self.store = store
        self.config = config
        self.metrics = pipeline.metrics
        self.stages = StageAttributes(config.decode.max_stages)
        self.lock = threading.Lock()
        self.wal, self.tracker = wal, tracker
        self._relink = relink or functools.partial(store.relink, limit=config.logs.max_linked)

    def _check_store(self, transport: str, signal: str) -> None:
        """While the store refuses writes nothing more is accepted: what is in flight
        already fills its backlog, and a client that is told to retry loses nothing."""
        if self.store.failing is not None:
            self.refused(transport, signal, "store_failing")
            raise Overloaded(self.config.serve.retry_after / 1e9, f"the findings store cannot write ({self.store.failing})")

    def refused(self, transport: str, signal: str, reason: str) -> None:
        """Counts a request answered with an error: overloaded, unauthenticated,
        undecodable, too large, unsupported type or encoding."""
        self.metrics.inc("traceguard_requests_refused_total", transport=transport, signal=signal, reason=reason)

    @contextlib.contextmanager
    def _wal_refusal(self, transport: str, signal: str) -> Iterator[None]:
        """A log that cannot take the request refuses it: counted, and the client retries later."""
        try:
            yield
        except WalFull as exc:
            self.refused(transport, signal, "wal_full")
            raise Overloaded(self.config.serve.retry_after / 1e9, str(exc)) from None

    def _logged(self, transport: str, signal: str, prepared: tuple | None) -> int | None:
        """Appends the request to the write-ahead log (under the lock, so log order is
        pipeline order); its sequence number, None without a log."""
        if prepared is None:
            return None
        with self._wal_refusal(transport, signal):
            return self.wal.append(prepared)

    def _durable(self, transport: str, signal: str, seq: int | None) -> None:
        """Waits for the record's fsync (shared with the requests waiting together): then it may be answered."""
        if seq is not None:
            with self._wal_refusal(transport, signal):
                self.wal.sync(seq)

    def traces(self, decoded: Decoded, transport: str, encoding: str = "proto", body: bytes = b"") -> tuple[int, str]:
        """Takes decoded spans (``body``: the request as it came, for the write-ahead log);
        returns (rejected, message) for the partial-success answer.

        Raises:
            Overloaded: not enough room for this request's spans, or the log is full.
        """
        started = time.perf_counter()
        self._check_store(transport, "traces")
        prepared = self.wal.prepare("traces", encoding, body) if self.wal is not None else None
        with self.lock:
            if self.pipeline.assembler.room() < len(decoded.rows):
                self.refused(transport, "traces", "overloaded")
                raise Overloaded(self.config.serve.retry_after / 1e9)
            seq = self._logged(transport, "traces", prepared)
            self.metrics.inc("traceguard_spans_received_total", len(decoded.rows) + decoded.rejected,
                             transport=transport)
            if decoded.rejected:
                self.metrics.inc("traceguard_spans_rejected_total", decoded.rejected, transport=transport)
            self._accept_spans(decoded, seq)
        self._durable(transport, "traces", seq)
        self.metrics.observe("traceguard_export_processing_seconds", time.perf_counter() - started)
        return decoded.rejected, "; ".join(decoded.errors)

    def logs(self, decoded: Decoded, transport: str, encoding: str = "proto", body: bytes = b"") -> tuple[int, str]:
        """Takes decoded log records; a record of an already decided trace is linked to its stored findings."""
        self._check_store(transport, "logs")
        prepared = self.wal.prepare("logs", encoding, body) if self.wal is not None else None
        with self.lock:
            seq = self._logged(transport, "logs", prepared)
            self.metrics.inc("traceguard_logs_received_total", len(decoded.rows) + decoded.rejected,
                             transport=transport)
            if decoded.rejected:
                self.metrics.inc("traceguard_logs_rejected_total", decoded.rejected, transport=transport)
            traces = self._accept_logs(decoded, seq)
        self._durable(transport, "logs", seq)
        for trace_id, logs in traces.items():
            self._relink(trace_id, logs)
        return decoded.rejected, "; ".join(decoded.errors)
    def _track(self, signal: str, decoded: Decoded, seq: int | None) -> set[bytes]:
        """The record's trace ids, tracked against its sequence number when it is logged."""
        trace_ids = {row.trace_id for row in decoded.rows}
        if seq is not None:
            self.tracker.track_record(WAL, seq, signal, trace_ids, self.pipeline.assembler, self.pipeline.now(),
                                      self.config.logs.ttl)
        return trace_ids

    def _accept_spans(self, decoded: Decoded, seq: int | None) -> None:
        self._track("traces", decoded, seq)
        self.pipeline.accept_spans(decoded.rows, decoded.events)

    def _accept_logs(self, decoded: Decoded, seq: int | None) -> dict:
        """Returns the logs of already decided traces, to be linked to their stored findings."""
        trace_ids = self._track("logs", decoded, seq)
        self.pipeline.accept_logs(decoded.rows)
        assembler = self.pipeline.assembler
        return {trace_id: self.pipeline.logs.get(trace_id) for trace_id in trace_ids if assembler.is_decided(trace_id)}

    def recover(self, start: Checkpoint | None = None) -> int:
        """Replays the write-ahead log from ``start`` (the position the loaded model snapshot
        covers), else from its own checkpoint (at start, before the receivers open): what
        was accepted before a crash is taken again; returns how many records."""
        checkpoint = start or self.wal.checkpoint()
        assembler = self.pipeline.assembler
        for trace_id, (_, decided_at) in checkpoint.straddlers.items():
            assembler.remember_decided(trace_id, decided_at)
        last_read = {trace_id: last for trace_id, (last, _) in checkpoint.straddlers.items()}
        replayed = 0
        for record in self.wal.replay(checkpoint.seq):
            replayed += 1
            try:
                decoded, _ = decode_body(record.signal, record.encoding, record.body, self.config.decode, self.stages)
            except DecodeError:  # it decoded when it was accepted: only a changed decoder gets here
                self.metrics.inc("traceguard_wal_corrupt_records_total")
                self.tracker.track_done(WAL, record.seq)
                continue
            with self.lock:
                if record.signal == "traces":
                    # rows of traces decided before the crash, up to their last record then, are done
                    decoded.rows = after_straddlers(decoded.rows, last_read, record.seq)
                    self._accept_spans(decoded, record.seq)
                else:
                    self._accept_logs(decoded, record.seq)
        self.metrics.inc("traceguard_wal_replayed_records_total", replayed)
        return replayed

    def position(self) -> Checkpoint:
        """Where a replay must start to rebuild the pipeline's state from a model snapshot
        taken now (call it under ``lock``): the oldest request whose traces are not all
        decided, and every decided trace with requests from there on, whose earlier
        records are skipped and later spans are late (they are in the snapshot already)."""
        seq = self.tracker.committable(WAL)
        seq = self.wal.next_seq if seq is None else seq
        assembler = self.pipeline.assembler
        return Checkpoint(seq, {trace_id: (last, assembler.decided_at(trace_id))
                                for trace_id, last in self.tracker.read_since(WAL, seq).items()
                                if assembler.is_decided(trace_id)})

    def commit_log(self, keep_from: int | None = None) -> None:
        """Trims the write-ahead log up to the oldest request whose traces are not all
        decided with their findings stored (never while the store holds findings back),
        and never past ``keep_from``, the position the last model snapshot covers."""
        with self.lock:
            if self.store.backlog:
                return
            self.tracker.expire(self.pipeline.now())  # logs whose traces never came
            seq = self.tracker.committable(WAL)
            if seq is None:
                return
            assembler = self.pipeline.assembler
            straddlers = {trace_id: (last, assembler.decided_at(trace_id) or 0)
                          for trace_id, last in self.tracker.straddlers(WAL, seq).items()}
        self.pipeline.flush_sinks()  # what the log drops is in the sinks, or with the group's judge
        if self.store.backlog:  # the store could not commit them: the log keeps them
            return
        self.wal.commit(Checkpoint(seq, straddlers), keep_from)
        with self.lock:
            self.tracker.committed(WAL, seq)

    def forward(self, signal: str, body: Callable[[], bytes]) -> None:
        """Passes an accepted request upstream, if forwarding is on (``body`` is only built then)."""
        if self.forwarder is not None:
            self.forwarder.submit(signal, body())

    def tick(self) -> None:
        """Decides what is due, a chunk at a time: between chunks the receivers
        get the lock, so a burst of due traces does not stall ingestion. Rows the
        store held back while it refused writes are tried again first, and a log
        that could not write is probed. The store commits what the tick wrote."""
        if self.store.backlog:
            self.store.retry()
        if self.wal is not None and self.wal.failing is not None:
            self.wal.probe()
        more = True
        while more:
            with self.lock:
                more = self.pipeline.advance(self.config.serve.decisions_per_lock)
        self.store.flush()
