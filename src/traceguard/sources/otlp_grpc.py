"""OTLP/gRPC receiver: ``TraceService/Export`` and ``LogsService/Export``.

Answers as the OTLP specification says: partial success with the rejected
count and the first reasons for spans that fail validation,
RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` in the trailing metadata
at the in-flight bound (the OpenTelemetry SDKs back off by it),
UNAUTHENTICATED without the bearer token when one is configured,
INVALID_ARGUMENT for a body that is not the message. grpcio itself refuses a
message over the size limit (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from concurrent import futures
from typing import Callable

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from traceguard.auth import bearer_matches
from traceguard.decode import DecodeError, decode_logs_proto, decode_traces_proto
from traceguard.decode.common import Decoded
from traceguard.sources.live import LiveIngest, Overloaded, export_response


def _refuse(context, overloaded: Overloaded) -> None:
    retry = RetryInfo(retry_delay=Duration(seconds=int(overloaded.retry_after_s),
                                           nanos=int(overloaded.retry_after_s % 1 * 1e9)))
    context.set_trailing_metadata((("google.rpc.retryinfo-bin", retry.SerializeToString()),))
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(overloaded))


class _Auth:
    def __init__(self, token: str | None, ingest: LiveIngest) -> None:
        self._token, self._ingest = token, ingest

    def check(self, context, signal: str) -> None:
        if self._token is None:
            return
        metadata = dict(context.invocation_metadata())
        if not bearer_matches(metadata.get("authorization"), self._token):
            self._ingest.refused("grpc", signal, "unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class _Export:
    """One ``Export`` method. It takes the raw request bytes (no deserializer), so
    the C traces decoder reads them directly, an undecodable body is answered
    INVALID_ARGUMENT as OTLP asks, and forwarding passes on exactly what came in."""

    def __init__(self, signal: str, decode: Callable[[bytes], Decoded],
                 accept: Callable[[Decoded, str, str, bytes], tuple[int, str]], ingest: LiveIngest,
                 auth: _Auth) -> None:
        self._signal, self._decode, self._accept = signal, decode, accept
        self._ingest, self._auth = ingest, auth

    def __call__(self, data: bytes, context):
        self._auth.check(context, self._signal)
        try:
            decoded = self._decode(data)
        except DecodeError as exc:
            self._ingest.refused("grpc", self._signal, "undecodable")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            rejected, message = self._accept(decoded, "grpc", "proto", data)
        except Overloaded as exc:
            _refuse(context, exc)
        self._ingest.forward(self._signal, lambda: data)
        return export_response(self._signal, rejected, message)


def _service(name: str, export: _Export, response) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(name, {"Export": grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None, response_serializer=response.SerializeToString)})


def start_grpc(ingest: LiveIngest, address: str, *, max_request_bytes: int, token: str | None = None,
               tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, int]:
    """Starts the receiver; returns the server and the port it bound (``:0`` picks one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"),
        options=[("grpc.max_receive_message_length", max_request_bytes)],
    )
    auth = _Auth(token, ingest)
    decode_config = ingest.config.decode
    traces = _Export("traces", lambda data: decode_traces_proto(data, decode_config, ingest.stages),
                     ingest.traces, ingest, auth)
    logs = _Export("logs", lambda data: decode_logs_proto(data, decode_config), ingest.logs, ingest, auth)
    server.add_generic_rpc_handlers((
        _service("opentelemetry.proto.collector.trace.v1.TraceService", traces, ExportTraceServiceResponse),
        _service("opentelemetry.proto.collector.logs.v1.LogsService", logs, ExportLogsServiceResponse),
    ))
    if tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port
