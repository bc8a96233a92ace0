"""Pass-through to an upstream OTLP/gRPC endpoint (the real Collector).

Adding the sidecar must never cost the user their telemetry, and forwarding
must never slow detection: accepted export requests go into a bounded queue
that one thread drains, retrying with capped exponential back-off. A full
queue drops the oldest request and counts it; a request that still fails
after ``ATTEMPTS`` tries is counted as a failure. Protobuf bodies are sent
as they came (no re-encoding); OTLP/JSON bodies are converted to protobuf.
"""

from __future__ import annotations

import base64
import collections
import logging
import threading
import time

import grpc
from google.protobuf.json_format import ParseDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from traceguard.metrics import Metrics

log = logging.getLogger("traceguard.forward")

ATTEMPTS = 5
_METHODS = {
    "traces": ("/opentelemetry.proto.collector.trace.v1.TraceService/Export", ExportTraceServiceResponse),
    "logs": ("/opentelemetry.proto.collector.logs.v1.LogsService/Export", ExportLogsServiceResponse),
}
_MESSAGES = {"traces": ExportTraceServiceRequest, "logs": ExportLogsServiceRequest}
_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def json_to_protobuf(signal: str, document: dict) -> bytes:
    """OTLP/JSON (hex ids) → serialized protobuf; json_format wants ids in base64."""
    def fix(node):
        if isinstance(node, dict):
            return {k: (base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_KEYS and isinstance(v, str)
                        and len(v) in (16, 32) else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return ParseDict(fix(document), _MESSAGES[signal](), ignore_unknown_fields=True).SerializeToString()


class Forwarder:
    def __init__(self, endpoint: str, metrics: Metrics, max_queue: int = 1000, timeout_s: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._calls = {signal: self._channel.unary_unary(method, request_serializer=None,
                                                        response_deserializer=response.FromString)
                       for signal, (method, response) in _METHODS.items()}
        self._metrics = metrics
        self._timeout = timeout_s
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._max_queue = max_queue
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="forward", daemon=True)
        self._thread.start()
        metrics.gauge("traceguard_forward_queue", lambda: len(self._queue))

    def submit(self, signal: str, body: bytes) -> None:
        """Queues one accepted export request (serialized protobuf); never blocks."""
        with self._wake:
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self._metrics.inc("traceguard_forward_dropped_total", signal=signal)
            self._queue.append((signal, body))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                signal, body = self._queue.popleft()
            self._send(signal, body)

    def _send(self, signal: str, body: bytes) -> None:
        for attempt in range(ATTEMPTS):
            try:
                self._calls[signal](body, timeout=self._timeout)
                self._metrics.inc("traceguard_forwarded_total", signal=signal)
                return
            except grpc.RpcError as error:
                if self._closing or attempt == ATTEMPTS - 1:
                    log.warning("forwarding %s failed: %s", signal, error.code())
                    break
                time.sleep(min(0.2 * 2**attempt, 5.0))
        self._metrics.inc("traceguard_forward_failures_total", signal=signal)

    def close(self, timeout_s: float) -> None:
        """Sends what is queued (bounded by ``timeout_s``), then stops; idempotent."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)
        self._channel.close()
