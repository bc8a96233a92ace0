"""OTLP/gRPC receiver: ``TraceService/Export`` and ``LogsService/Export``.

Answers as the OTLP specification says: partial success with the rejected
count and the first reasons for spans that fail validation,
RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` in the trailing metadata
at the in-flight bound (the OpenTelemetry SDKs back off by it),
UNAUTHENTICATED without the bearer token when one is configured. grpcio
itself refuses a message over the size limit (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from concurrent import futures

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from traceguard.decode.otlp_proto import decode_logs_message, decode_traces_message
from traceguard.sources.live import LiveIngest, Overloaded, export_response


def _refuse(context, overloaded: Overloaded) -> None:
    retry = RetryInfo(retry_delay=Duration(seconds=int(overloaded.retry_after_s),
                                           nanos=int(overloaded.retry_after_s % 1 * 1e9)))
    context.set_trailing_metadata((("google.rpc.retryinfo-bin", retry.SerializeToString()),))
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(overloaded))


class _Auth:
    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}" if token else None

    def check(self, context) -> None:
        if self._expected is None:
            return
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != self._expected:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, ingest: LiveIngest, auth: _Auth) -> None:
        self._ingest, self._auth = ingest, auth

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self._auth.check(context)
        decoded = decode_traces_message(request, self._ingest.config.decode, self._ingest.stages)
        try:
            rejected, message = self._ingest.traces(decoded, "grpc")
        except Overloaded as exc:
            _refuse(context, exc)
        self._ingest.forward("traces", request.SerializeToString)
        return export_response("traces", rejected, message)


class LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, ingest: LiveIngest, auth: _Auth) -> None:
        self._ingest, self._auth = ingest, auth

    def Export(self, request, context):  # noqa: N802
        self._auth.check(context)
        decoded = decode_logs_message(request, self._ingest.config.decode)
        rejected, message = self._ingest.logs(decoded, "grpc")
        self._ingest.forward("logs", request.SerializeToString)
        return export_response("logs", rejected, message)


def start_grpc(ingest: LiveIngest, address: str, *, max_request_bytes: int, token: str | None = None,
               tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, int]:
    """Starts the receiver; returns the server and the port it bound (``:0`` picks one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"),
        options=[("grpc.max_receive_message_length", max_request_bytes)],
    )
    auth = _Auth(token)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(ingest, auth), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(LogsService(ingest, auth), server)
    if tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port
