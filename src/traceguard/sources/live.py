"""The edge both live OTLP receivers share: decode, check the bounds, hand over.

Decoding runs on the receiver's thread; everything that touches the pipeline
runs under one lock, so gRPC workers, the HTTP loop and the ticker never see
a half-updated assembler. At the in-flight bound a request is refused whole
(``Overloaded``): the client retries after ``retry_after`` instead of this
process growing, and nothing it sent is half accepted.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from traceguard.config import PipelineConfig
from traceguard.decode import Decoded
from traceguard.decode.common import StageAttributes
from traceguard.pipeline import Pipeline
from traceguard.sinks.sqlite import SqliteStore
from traceguard.sources.forward import Forwarder


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
                 forwarder: Forwarder | None = None) -> None:
        self.pipeline = pipeline
        self.forwarder = forwarder
        self.store = store
        self.config = config
        self.metrics = pipeline.metrics
        self.stages = StageAttributes(config.decode.max_stages)
        self.lock = threading.Lock()

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

    def traces(self, decoded: Decoded, transport: str) -> tuple[int, str]:
        """Takes decoded spans; returns (rejected, message) for the partial-success answer.

        Raises:
            Overloaded: not enough room for this request's spans.
        """
        started = time.perf_counter()
        self._check_store(transport, "traces")
        with self.lock:
            if self.pipeline.assembler.room() < len(decoded.rows):
                self.refused(transport, "traces", "overloaded")
                raise Overloaded(self.config.serve.retry_after / 1e9)
            self.metrics.inc("traceguard_spans_received_total", len(decoded.rows) + decoded.rejected,
                             transport=transport)
            if decoded.rejected:
                self.metrics.inc("traceguard_spans_rejected_total", decoded.rejected, transport=transport)
            self.pipeline.accept_spans(decoded.rows, decoded.events)
        self.metrics.observe("traceguard_export_processing_seconds", time.perf_counter() - started)
        return decoded.rejected, "; ".join(decoded.errors)

    def logs(self, decoded: Decoded, transport: str) -> tuple[int, str]:
        """Takes decoded log records; a record of an already decided trace is linked to its stored findings."""
        self._check_store(transport, "logs")
        with self.lock:
            self.metrics.inc("traceguard_logs_received_total", len(decoded.rows) + decoded.rejected,
                             transport=transport)
            if decoded.rejected:
                self.metrics.inc("traceguard_logs_rejected_total", decoded.rejected, transport=transport)
            self.pipeline.accept_logs(decoded.rows)
            late = {row.trace_id for row in decoded.rows if self.pipeline.assembler.is_decided(row.trace_id)}
            traces = {trace_id: self.pipeline.logs.get(trace_id) for trace_id in late}
        for trace_id, logs in traces.items():
            self.store.relink(trace_id, logs, self.config.logs.max_linked)
        return decoded.rejected, "; ".join(decoded.errors)

    def forward(self, signal: str, body: Callable[[], bytes]) -> None:
        """Passes an accepted request upstream, if forwarding is on (``body`` is only built then)."""
        if self.forwarder is not None:
            self.forwarder.submit(signal, body())

    def tick(self) -> None:
        """Decides what is due, a chunk at a time: between chunks the receivers
        get the lock, so a burst of due traces does not stall ingestion. Rows the
        store held back while it refused writes are tried again first."""
        if self.store.backlog:
            self.store.retry()
        more = True
        while more:
            with self.lock:
                more = self.pipeline.advance(self.config.serve.decisions_per_lock)
