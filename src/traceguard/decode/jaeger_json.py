"""Jaeger JSON, as the Jaeger UI and query API download it → rows.

``{"data": [{"traceID", "spans": [...], "processes": {pID: {serviceName, tags}}}]}``.
Span kind from the ``span.kind`` tag, errors from the ``error`` tag or
``otel.status_code``; the parent is the first CHILD_OF reference (else the first
FOLLOWS_FROM), and every FOLLOWS_FROM reference is kept as a link, which
exempts the span from ``context_outlived_parent`` as an OTLP link does. Span
logs become log records of that span. Times are microseconds.
"""

from __future__ import annotations

from traceguard.config import DecodeConfig
from traceguard.decode.common import UNKNOWN_SERVICE, Decoded, StageAttributes
from traceguard.decode.translate import KINDS, OtlpDocuments, attributes, micros_to_nanos, pad_trace_id, status_of


def _tags(items) -> dict:
    return {tag.get("key"): tag.get("value") for tag in items or () if isinstance(tag, dict)}


def decode_jaeger_traces(traces: list, config: DecodeConfig,
                         stages: StageAttributes | None = None) -> tuple[Decoded, Decoded]:
    """(spans, logs) of Jaeger trace objects: elements of a download's ``data`` list,
    which a replay reads one at a time.

    A trace or span that is not shaped like one is rejected alone.
    """
    out = OtlpDocuments()
    for trace in traces:
        try:
            processes, spans = trace.get("processes") or {}, trace.get("spans") or ()
        except AttributeError as exc:
            out.malformed(f"malformed Jaeger trace: {exc}")
            continue
        for span in spans:
            try:
                _span(span, processes, out)
            except (AttributeError, TypeError) as exc:
                out.malformed(f"malformed Jaeger span: {exc}")
    return out.decode(config, stages)


def _span(span: dict, processes: dict, out: OtlpDocuments) -> None:
    trace_id = pad_trace_id(span.get("traceID"))
    tags = _tags(span.get("tags"))
    process = processes.get(span.get("processID")) or span.get("process") or {}
    service = process.get("serviceName") or UNKNOWN_SERVICE
    parent, links = None, []
    for ref in span.get("references") or ():
        ref_type = str(ref.get("refType", "")).upper()
        if ref_type == "FOLLOWS_FROM":
            links.append({"traceId": pad_trace_id(ref.get("traceID")), "spanId": ref.get("spanID")})
        if parent is None and pad_trace_id(ref.get("traceID")) == trace_id and ref_type == "CHILD_OF":
            parent = ref.get("spanID")
    if parent is None and links and links[0]["traceId"] == trace_id:
        parent = links[0]["spanId"]
    start = micros_to_nanos(span.get("startTime"))
    duration = micros_to_nanos(span.get("duration"))
    end = start + duration if start is not None and duration is not None else 0
    kept = [(k, v) for k, v in tags.items() if k not in ("span.kind", "error", "otel.status_code")]
    out.span(service, {
        "traceId": trace_id, "spanId": span.get("spanID"), "parentSpanId": parent or "",
        "name": span.get("operationName") or "", "kind": KINDS.get(str(tags.get("span.kind", "internal")).lower(), 1),
        "startTimeUnixNano": str(start or 0), "endTimeUnixNano": str(end),
        "attributes": attributes(kept), "status": {"code": status_of(tags)}, "links": links,
    })
    for entry in span.get("logs") or ():
        time_ns = micros_to_nanos(entry.get("timestamp")) or 0
        out.log(service, out.log_record(trace_id, span.get("spanID"), time_ns, _tags(entry.get("fields"))))
