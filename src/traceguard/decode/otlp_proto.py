"""OTLP protobuf → rows.

``ExportTraceServiceRequest`` and ``TracesData`` share their wire layout (field
1, repeated ResourceSpans), as do ``ExportLogsServiceRequest`` and
``LogsData``, so one message type decodes both. This is the hot path of every
source. The C walks in ``_rows.c`` check the bytes against the message schema
as upb would and read the kept fields straight from them into span and log
rows; whatever they cannot show valid goes to upb, so accepting and rejecting
stay upb's decisions. ``decode_traces_message`` and ``decode_logs_message``
over upb's parse are the references they are tested against, and the fallback
where the extension is not built or meets a layout it does not walk.
"""

from __future__ import annotations

import sys

from google.protobuf.message import DecodeError as ProtoDecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from traceguard.config import DecodeConfig
from traceguard.decode.common import (
    ATTRIBUTE_KINDS,
    KEPT_ATTRIBUTES,
    RESOURCE_KEYS,
    MAX_ERROR_MESSAGES,
    UNKNOWN_SERVICE,
    StageAttributes,
    Decoded,
    DecodeError,
    clip,
    clip_value,
    intern_name,
    response_status,
)
from traceguard.decode.events import event_logs
from traceguard.native import rows as native
from traceguard.records import FLAG_HAS_LINKS, NO_PARENT, SPAN_CORE, LogRow, SpanRow

_ZERO_TRACE = bytes(16)


def _resource_names(resource, limit: int) -> tuple[str, str | None]:
    """The service (the first service.name) and the pod (the first k8s.pod.name,
    else the first service.instance.id; None without a non-empty one)."""
    first: dict[str, str] = {}
    for kv in resource.attributes:
        if kv.key in RESOURCE_KEYS:
            first.setdefault(kv.key, kv.value.string_value)
    service = intern_name(first.get("service.name") or UNKNOWN_SERVICE, limit)
    pod = first.get("k8s.pod.name") or first.get("service.instance.id")
    return service, intern_name(pod, limit) if pod else None


def _any_value(value):
    which = value.WhichOneof("value")
    return None if which is None else getattr(value, which)


def _kept_attributes(span, value_limit: int) -> list:
    return [(kv.key, clip_value(_any_value(kv.value), value_limit))
            for kv in span.attributes if kv.key in KEPT_ATTRIBUTES]


def decode_traces_proto(
    data: bytes, config: DecodeConfig, stages: StageAttributes | None = None
) -> Decoded[SpanRow]:
    """Decodes a serialized ExportTraceServiceRequest / TracesData.

    Raises:
        DecodeError: the bytes are not such a message.
    """
    stages = stages or StageAttributes()
    if native is not None:
        # (try, not contextlib.suppress: this runs per message, and a Kafka message holds a few spans)
        try:
            return _decode_native(data, config, stages)
        except native.Unsupported:
            pass  # bytes the C walk cannot show valid, or a layout it does not walk: upb and the reference decide
    return decode_traces_message(_parse_traces(data), config, stages)


def _parse_traces(data: bytes) -> ExportTraceServiceRequest:
    try:
        return ExportTraceServiceRequest.FromString(data)
    except (ProtoDecodeError, RuntimeError) as exc:
        raise DecodeError(f"not an OTLP traces protobuf message: {exc}") from None


def _decode_native(data: bytes, config: DecodeConfig, stages: StageAttributes) -> Decoded[SpanRow]:
    """The C walk; the stage cache is given the kept attributes of the spans it does not answer for."""
    rows, rejected, errors, pending, evented = native.decode_spans(
        data, stages.known, KEPT_ATTRIBUTES, config.max_name_length, config.max_attribute_length,
        MAX_ERROR_MESSAGES, UNKNOWN_SERVICE)
    stages.settle(pending)
    limit = config.max_log_body_length
    return Decoded(rows, rejected, errors, [log for row, message in evented
                                            for log in _event_logs(row, Span.FromString(message), limit)])


def _event_logs(row: SpanRow, span: Span, limit: int) -> list[LogRow]:
    return event_logs(row, ((event.time_unix_nano, event.name, {kv.key: _any_value(kv.value) for kv in event.attributes})
                            for event in span.events), limit)


def decode_traces_message(
    request, config: DecodeConfig, stages: StageAttributes | None = None
) -> Decoded[SpanRow]:
    out: Decoded[SpanRow] = Decoded()
    rows = out.rows
    append = rows.append
    pack = SPAN_CORE.pack
    stage_attributes = (stages or StageAttributes()).get
    intern = sys.intern
    name_limit = config.max_name_length
    value_limit = config.max_attribute_length
    for resource_spans in request.resource_spans:
        service, instance = _resource_names(resource_spans.resource, name_limit)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                parent = span.parent_span_id
                if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
                    out.reject(f"span {span_id.hex() or '?'}: trace_id must be 16 non-zero bytes, got {len(trace_id)}")
                    continue
                if len(span_id) != 8 or span_id == NO_PARENT:
                    out.reject(f"trace {trace_id.hex()}: span_id must be 8 non-zero bytes, got {len(span_id)}")
                    continue
                if parent and len(parent) != 8:
                    out.reject(f"span {span_id.hex()}: parent_span_id must be empty or 8 bytes, got {len(parent)}")
                    continue
                kind = span.kind
                if not 0 <= kind <= 5:  # open enum: unknown values mean unspecified
                    kind = 0
                code = span.status.code
                if not 0 <= code <= 2:
                    code = 0
                if code == 0 and span.attributes:
                    code = response_status(code, kind, ((kv.key, _any_value(kv.value)) for kv in span.attributes))
                name = span.name
                name = intern(name if len(name) <= name_limit else name[:name_limit])
                attrs = None
                if kind in ATTRIBUTE_KINDS:
                    attrs = stage_attributes(service, kind, name, code,
                                             lambda: _kept_attributes(span, value_limit))
                row = SpanRow(
                    trace_id,
                    pack(span_id, parent or NO_PARENT, span.start_time_unix_nano, kind,
                         code, FLAG_HAS_LINKS if span.links else 0),
                    span.end_time_unix_nano,
                    service,
                    name,
                    attrs,
                    instance,
                )
                append(row)
                if span.events:
                    out.events += _event_logs(row, span, config.max_log_body_length)
    return out


def decode_logs_proto(data: bytes, config: DecodeConfig) -> Decoded[LogRow]:
    """Decodes a serialized ExportLogsServiceRequest / LogsData.

    Records without a trace id cannot be linked to anything and are skipped
    (not rejected: they are valid OTLP).

    Raises:
        DecodeError: the bytes are not such a message.
    """
    if native is not None:
        try:
            rows, rejected, errors = native.decode_logs(data, config.max_name_length, config.max_log_body_length,
                                                        MAX_ERROR_MESSAGES, UNKNOWN_SERVICE)
            return Decoded(rows, rejected, errors)
        except native.Unsupported:
            pass  # as for traces: upb and the reference decide
    try:
        request = ExportLogsServiceRequest.FromString(data)
    except (ProtoDecodeError, RuntimeError) as exc:
        raise DecodeError(f"not an OTLP logs protobuf message: {exc}") from None
    return decode_logs_message(request, config)


def decode_logs_message(request, config: DecodeConfig) -> Decoded[LogRow]:
    out: Decoded[LogRow] = Decoded()
    body_limit = config.max_log_body_length
    for resource_logs in request.resource_logs:
        service = _resource_names(resource_logs.resource, config.max_name_length)[0]
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                trace_id = record.trace_id
                if not trace_id:
                    continue
                if len(trace_id) != 16:
                    out.reject(f"log record: trace_id must be 16 bytes, got {len(trace_id)}")
                    continue
                span_id = record.span_id
                if span_id and len(span_id) != 8:
                    out.reject(f"log record of trace {trace_id.hex()}: span_id must be 8 bytes, got {len(span_id)}")
                    continue
                body = _any_value(record.body)
                out.rows.append(LogRow(
                    trace_id,
                    span_id or None,
                    record.time_unix_nano or record.observed_time_unix_nano,
                    record.severity_number,
                    record.severity_text,
                    clip(body if isinstance(body, str) else str(body or ""), body_limit),
                    service,
                ))
    return out
