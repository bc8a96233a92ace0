"""OTLP/JSON → rows, by a direct walk of the structure parsed with orjson.

Accepts what the OpenTelemetry Collector's file exporter writes (lowerCamelCase
keys, hex ids, int64 as strings, enums as integers) and what generic protobuf
JSON tools emit (base64 ids, enum names). ``google.protobuf.json_format`` is
about 20x slower on the same input, which is why this walk exists. Traces in
the form the Collector writes are walked by ``_rows.decode_json_spans`` in C;
``_walk_traces`` is its reference and handles every other form.
"""

from __future__ import annotations

import binascii
from typing import Any

import orjson
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from traceguard.config import DecodeConfig
from traceguard.decode.common import (
    ATTRIBUTE_KINDS,
    KEPT_ATTRIBUTES,
    RESOURCE_KEYS,
    StageAttributes,
    UNKNOWN_SERVICE,
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

_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3, "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5,
}
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_SEVERITY_NAMES = dict(SeverityNumber.items())
_VALUE_KEYS = ("stringValue", "intValue", "boolValue", "doubleValue")
_ZERO_TRACE = bytes(16)


class _BadField(ValueError):
    pass


def _decode_id(text: Any, size: int, what: str) -> bytes:
    """Hex per the OTLP/JSON spec, or base64 as protobuf JSON tools write it."""
    if not text:
        return b""
    if not isinstance(text, str):
        raise _BadField(f"{what} must be a string")
    try:
        if len(text) == 2 * size:
            return bytes.fromhex(text)
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (ValueError, binascii.Error):
        raise _BadField(f"{what} {text[:40]!r} is neither hex nor base64") from None
    if len(raw) != size:
        raise _BadField(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _enum(value: Any, names: dict[str, int], what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, str) and value in names:
        return names[value]
    raise _BadField(f"{what} {value!r} is not valid")


def _nanos(value: Any, what: str) -> int:
    if value is None:
        return 0
    try:
        nanos = int(value)
    except (TypeError, ValueError):
        raise _BadField(f"{what} {value!r} is not an integer") from None
    if not 0 <= nanos < 1 << 64:
        raise _BadField(f"{what} {value!r} is out of range")
    return nanos


def _any_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    for key in _VALUE_KEYS:
        if key in value:
            found = value[key]
            if key != "intValue":
                return found
            try:
                return int(found)
            except (TypeError, ValueError, OverflowError):  # not an integer: no usable value
                return None
    return None


def _resource_names(resource: Any, limit: int) -> tuple[str, str | None]:
    """The service (the first non-empty service.name) and the pod (the first
    non-empty k8s.pod.name, else service.instance.id; or None)."""
    first: dict[str, str] = {}
    if isinstance(resource, dict):
        for kv in resource.get("attributes") or ():
            key = kv.get("key")
            if isinstance(key, str) and key in RESOURCE_KEYS and key not in first:
                value = _any_value(kv.get("value"))
                if isinstance(value, str) and value:
                    first[key] = intern_name(value, limit)
    return first.get("service.name", UNKNOWN_SERVICE), first.get("k8s.pod.name") or first.get("service.instance.id")


def _list(node: Any, key: str) -> list:
    value = node.get(key) if isinstance(node, dict) else None
    if value is None:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"{key} must be a list")
    return value


def decode_traces_json(
    document: dict, config: DecodeConfig, stages: StageAttributes | None = None
) -> Decoded[SpanRow]:
    """Decodes one parsed TracesData / ExportTraceServiceRequest object.

    Raises:
        DecodeError: the object is not shaped like OTLP traces at all.
    """
    stages = stages or StageAttributes()
    if native is not None:
        # the Collector's own form is walked in C; anything else, or anything to reject, here
        try:
            rows, pending, evented = native.decode_json_spans(
                document, stages.known, KEPT_ATTRIBUTES, config.max_name_length, config.max_attribute_length,
                UNKNOWN_SERVICE)
        except native.Unsupported:
            pass  # decided by the walk below
        else:
            stages.settle(pending)
            limit = config.max_log_body_length
            return Decoded(rows, events=[log for row, span in evented for log in _event_logs(row, span, limit)])
    try:
        return _walk_traces(document, config, stages)
    except (AttributeError, TypeError) as exc:
        raise DecodeError(f"malformed OTLP traces JSON: {exc}") from None


_U64 = 1 << 64


def _span_fields(span: dict) -> tuple[bytes, bytes, bytes, int, int, int, int, str]:
    """Validated (trace id, span id, parent, kind, status code, start, end, name).

    The fast path reads what the Collector writes (hex ids, integer enums);
    anything else goes through the general converters, which also word the
    rejections.
    """
    get = span.get
    trace_text, span_text, parent_text = get("traceId"), get("spanId"), get("parentSpanId")
    try:
        trace_id = bytes.fromhex(trace_text)
        span_id = bytes.fromhex(span_text)
        parent = bytes.fromhex(parent_text) if parent_text else b""
        if len(trace_id) != 16 or len(span_id) != 8 or (parent and len(parent) != 8):
            raise ValueError
    except (TypeError, ValueError):
        trace_id = _decode_id(trace_text, 16, "traceId")
        span_id = _decode_id(span_text, 8, "spanId")
        parent = _decode_id(parent_text, 8, "parentSpanId")
    if not trace_id or trace_id == _ZERO_TRACE:
        raise _BadField("traceId must be 16 non-zero bytes")
    if not span_id or span_id == NO_PARENT:
        raise _BadField("spanId must be 8 non-zero bytes")
    kind = get("kind", 0)
    if kind.__class__ is not int or not 0 <= kind <= 5:
        kind = _enum(kind, _KIND_NAMES, "kind")
    status = get("status")
    code = status.get("code", 0) if status else 0
    if code.__class__ is not int or not 0 <= code <= 2:
        code = _enum(code, _STATUS_NAMES, "status.code")
    try:
        start = int(get("startTimeUnixNano") or 0)
        end = int(get("endTimeUnixNano") or 0)
        if not (0 <= start < _U64 and 0 <= end < _U64):
            raise ValueError
    except (TypeError, ValueError):
        start = _nanos(get("startTimeUnixNano"), "startTimeUnixNano")
        end = _nanos(get("endTimeUnixNano"), "endTimeUnixNano")
    name = get("name") or ""
    if name.__class__ is not str:
        raise _BadField("name must be a string")
    return trace_id, span_id, parent, kind, code, start, end, name


def _walk_traces(document: dict, config: DecodeConfig, stages: StageAttributes) -> Decoded[SpanRow]:
    out: Decoded[SpanRow] = Decoded()
    append = out.rows.append
    pack = SPAN_CORE.pack
    name_limit = config.max_name_length
    value_limit = config.max_attribute_length
    for resource_spans in _list(document, "resourceSpans"):
        service, instance = _resource_names(resource_spans.get("resource"), name_limit)
        for scope_spans in _list(resource_spans, "scopeSpans"):
            for span in _list(scope_spans, "spans"):
                try:
                    trace_id, span_id, parent, kind, code, start, end, name = _span_fields(span)
                except _BadField as exc:
                    out.reject(f"span {span.get('spanId', '?')}: {exc}")
                    continue
                except AttributeError:
                    out.reject("span is not an object")
                    continue
                name = intern_name(name, name_limit)
                attributes = span.get("attributes")
                if code == 0 and isinstance(attributes, list):
                    code = response_status(code, kind, ((kv.get("key"), _any_value(kv.get("value")))
                                                        for kv in attributes if isinstance(kv, dict)))
                attrs = None
                if kind in ATTRIBUTE_KINDS:
                    attrs = stages.get(service, kind, name, code, lambda: [
                        (kv["key"], clip_value(_any_value(kv.get("value")), value_limit))
                        for kv in span.get("attributes") or ()
                        if isinstance(kv, dict) and kv.get("key") in KEPT_ATTRIBUTES
                    ])
                row = SpanRow(
                    trace_id,
                    pack(span_id, parent or NO_PARENT, start, kind, code,
                         FLAG_HAS_LINKS if span.get("links") else 0),
                    end,
                    service,
                    name,
                    attrs,
                    instance,
                )
                append(row)
                if span.get("events"):
                    out.events += _event_logs(row, span, config.max_log_body_length)
    return out


def _event_logs(row: SpanRow, span: dict, limit: int) -> list[LogRow]:
    """A span's events (malformed parts are read leniently: an event without a
    valid time is at its span's end, an attribute without a key is left out)."""
    events = span["events"]
    return event_logs(row, ((_event_time(event), str(event.get("name") or ""), {
        kv["key"]: _any_value(kv.get("value")) for kv in event.get("attributes") or ()
        if isinstance(kv, dict) and isinstance(kv.get("key"), str)
    }) for event in (events if isinstance(events, list) else ()) if isinstance(event, dict)), limit)


def _event_time(event: dict) -> int:
    try:
        return _nanos(event.get("timeUnixNano"), "timeUnixNano")
    except _BadField:
        return 0


def decode_logs_json(document: dict, config: DecodeConfig) -> Decoded[LogRow]:
    """Decodes one parsed LogsData / ExportLogsServiceRequest object.

    Records without a trace id are skipped (valid, but nothing to link to).

    Raises:
        DecodeError: the object is not shaped like OTLP logs at all.
    """
    try:
        return _walk_logs(document, config)
    except (AttributeError, TypeError) as exc:
        raise DecodeError(f"malformed OTLP logs JSON: {exc}") from None


def _walk_logs(document: dict, config: DecodeConfig) -> Decoded[LogRow]:
    out: Decoded[LogRow] = Decoded()
    body_limit = config.max_log_body_length
    for resource_logs in _list(document, "resourceLogs"):
        service = _resource_names(resource_logs.get("resource"), config.max_name_length)[0]
        for scope_logs in _list(resource_logs, "scopeLogs"):
            for record in _list(scope_logs, "logRecords"):
                try:
                    trace_id = _decode_id(record.get("traceId"), 16, "traceId")
                    if not trace_id:
                        continue
                    span_id = _decode_id(record.get("spanId"), 8, "spanId")
                    time = _nanos(record.get("timeUnixNano"), "timeUnixNano") or _nanos(
                        record.get("observedTimeUnixNano"), "observedTimeUnixNano"
                    )
                    severity = _enum(record.get("severityNumber"), _SEVERITY_NAMES, "severityNumber")
                except _BadField as exc:
                    out.reject(f"log record: {exc}")
                    continue
                except AttributeError:
                    out.reject("log record is not an object")
                    continue
                body = _any_value(record.get("body"))
                out.rows.append(LogRow(
                    trace_id,
                    span_id or None,
                    time,
                    severity,
                    str(record.get("severityText") or ""),
                    clip(body if isinstance(body, str) else orjson.dumps(body).decode(), body_limit),
                    service,
                ))
    return out


def decode_json_line(line: bytes) -> tuple[str, dict]:
    """Parses one JSON line and says whether it holds traces or logs.

    Raises:
        DecodeError: not JSON, or neither ``resourceSpans`` nor ``resourceLogs``.
    """
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if isinstance(document, dict):
        if "resourceSpans" in document:
            return "traces", document
        if "resourceLogs" in document:
            return "logs", document
        if not document:
            return "traces", document
    raise DecodeError("not an OTLP JSON object: expected resourceSpans or resourceLogs")
