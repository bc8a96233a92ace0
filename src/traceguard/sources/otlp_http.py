"""OTLP/HTTP receiver: ``POST /v1/traces`` and ``POST /v1/logs``.

Protobuf (``application/x-protobuf``) and JSON (``application/json``) bodies,
gzip content-encoding, answered in the request's encoding as the OTLP
specification says: 200 with partial success for rejected records, 400 for a
body that does not decode, 413 over the size limit (compressed or not), 415
for another content type, 429 with ``Retry-After`` at the in-flight bound,
401 without the bearer token when one is configured.
"""

from __future__ import annotations

import asyncio
import zlib

import orjson
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from google.protobuf.json_format import MessageToDict
from google.rpc.status_pb2 import Status

from traceguard.auth import bearer_matches
from traceguard.decode import DecodeError
from traceguard.sources.forward import json_to_protobuf
from traceguard.sources.live import LiveIngest, Overloaded, decode_body, export_response

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


_REASONS = {400: "undecodable", 401: "unauthenticated", 408: "too_slow", 413: "too_large", 415: "unsupported",
            503: "receiving_bound"}


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _answer(message, content_type: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if content_type == JSON:
        body = orjson.dumps(MessageToDict(message))
    else:
        body = message.SerializeToString()
    return Response(body, status_code=status, media_type=content_type, headers=headers)


class _Receiving:
    """Bytes of the bodies still arriving, all requests together, against one budget."""

    def __init__(self, budget: int, retry_after_s: float) -> None:
        self.held, self.budget, self.retry_after_s = 0, budget, retry_after_s


async def _body(request: Request, limit: int, receiving: _Receiving, timeout_s: float) -> bytes:
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                receiving.held += len(chunk)
                if size > limit:
                    raise _Refused(413, f"request body over the {limit}-byte limit")
                if receiving.held > receiving.budget:
                    raise _Refused(503, "traceguard holds too many request bodies in arrival; retry later",
                                   {"Retry-After": str(max(1, round(receiving.retry_after_s)))})
                chunks.append(chunk)
    except TimeoutError:
        raise _Refused(408, f"the request body did not arrive within {timeout_s:g} s") from None
    finally:
        receiving.held -= size
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise _Refused(400, f"gzip body does not decompress: {exc}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise _Refused(413, f"decompressed body over the {limit}-byte limit")
    elif encoding != "identity":
        raise _Refused(415, f"content-encoding {encoding!r} is not supported (gzip is)")
    return body


def create_otlp_http(ingest: LiveIngest, *, max_request_bytes: int, token: str | None,
                     read_timeout_s: float, max_receiving_bytes: int) -> FastAPI:
    app = FastAPI(title="traceguard OTLP/HTTP receiver", openapi_url=None, docs_url=None, redoc_url=None)
    receiving = _Receiving(max_receiving_bytes, ingest.config.serve.retry_after / 1e9)
    decode_config = ingest.config.decode

    def handle(body: bytes, content_type: str, signal: str) -> tuple[int, str]:
        encoding = "json" if content_type == JSON else "proto"
        try:
            decoded, document = decode_body(signal, encoding, body, decode_config, ingest.stages)
        except DecodeError as exc:
            raise _Refused(400, f"undecodable {signal} body: {exc}") from None
        try:
            accept = ingest.traces if signal == "traces" else ingest.logs
            answer = accept(decoded, "http", encoding, body)
        except Overloaded as exc:
            raise _Refused(429, str(exc), {"Retry-After": str(max(1, round(exc.retry_after_s)))}) from None
        ingest.forward(signal, (lambda: json_to_protobuf(signal, document)) if document is not None else lambda: body)
        return answer

    async def receive(request: Request, signal: str) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        answer_type = JSON if content_type == JSON else PROTOBUF
        try:
            if token is not None and not bearer_matches(request.headers.get("authorization"), token):
                raise _Refused(401, "missing or wrong bearer token")
            if content_type not in (PROTOBUF, JSON):
                raise _Refused(415, f"content-type {content_type!r} is not supported ({PROTOBUF} or {JSON})")
            body = await _body(request, max_request_bytes, receiving, read_timeout_s)
            # decoding and the pipeline lock stay off the event loop
            rejected, message = await run_in_threadpool(handle, body, content_type, signal)
        except _Refused as refused:
            if refused.status != 429:  # counted where the pipeline refused it
                ingest.refused("http", signal, _REASONS[refused.status])
            return _answer(Status(code=0, message=refused.message), answer_type, refused.status, refused.headers)
        return _answer(export_response(signal, rejected, message), answer_type)

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        return await receive(request, "traces")

    @app.post("/v1/logs")
    async def logs(request: Request) -> Response:
        return await receive(request, "logs")

    return app
