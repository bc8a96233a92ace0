"""Zipkin v2 JSON (a list of spans) → rows.

Fields: traceId (64 or 128 bit hex), id, parentId, name, kind, timestamp and
duration in microseconds, localEndpoint.serviceName, tags, annotations. Zipkin
lets a client and its server share one span id (``shared: true`` on the
server side); OTLP gives the server span its own id, so it gets one derived
from the shared id, with the client span as its parent. Errors from the
``error`` tag or ``otel.status_code``; annotations become log records.
"""

from __future__ import annotations

import hashlib

from traceguard.config import DecodeConfig
from traceguard.decode.common import UNKNOWN_SERVICE, Decoded, StageAttributes
from traceguard.decode.translate import KINDS, OtlpDocuments, attributes, micros_to_nanos, pad_trace_id, status_of


def shared_server_id(span_id: str) -> str:
    """The id a shared server span gets: stable, so replays agree."""
    return hashlib.sha256(f"{span_id}/server".encode()).hexdigest()[:16]


def decode_zipkin_spans(spans: list, config: DecodeConfig,
                        stages: StageAttributes | None = None) -> tuple[Decoded, Decoded]:
    """(spans, logs) of Zipkin v2 spans: elements of the file's list, which a replay
    reads a chunk at a time.

    A span that is not shaped like one is rejected alone.
    """
    out = OtlpDocuments()
    for span in spans:
        try:
            _span(span, out)
        except (AttributeError, TypeError) as exc:
            out.malformed(f"malformed Zipkin span: {exc}")
    return out.decode(config, stages)


def _span(span: dict, out: OtlpDocuments) -> None:
    trace_id = pad_trace_id(span.get("traceId"))
    tags = span.get("tags") or {}
    service = (span.get("localEndpoint") or {}).get("serviceName") or UNKNOWN_SERVICE
    span_id, parent = span.get("id"), span.get("parentId") or ""
    kind = KINDS.get(str(span.get("kind") or "internal").lower(), 1)
    if span.get("shared") and kind == KINDS["server"] and isinstance(span_id, str):
        span_id, parent = shared_server_id(span_id), span_id
    start = micros_to_nanos(span.get("timestamp"))
    duration = micros_to_nanos(span.get("duration"))
    end = start + duration if start is not None and duration is not None else 0
    kept = [(k, v) for k, v in tags.items() if k not in ("error", "otel.status_code")]
    out.span(service, {
        "traceId": trace_id, "spanId": span_id, "parentSpanId": parent, "name": span.get("name") or "",
        "kind": kind, "startTimeUnixNano": str(start or 0), "endTimeUnixNano": str(end),
        "attributes": attributes(kept), "status": {"code": status_of(tags)},
    })
    for note in span.get("annotations") or ():
        time_ns = micros_to_nanos(note.get("timestamp")) or 0
        out.log(service, out.log_record(trace_id, span_id, time_ns, {"message": note.get("value", "")}))
