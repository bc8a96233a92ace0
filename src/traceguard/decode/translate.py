"""What the Jaeger and Zipkin decoders share: they translate into OTLP/JSON
documents and hand them to the OTLP/JSON decoder, so every format goes through
one set of id checks, attribute rules and rejections.
"""

from __future__ import annotations

from typing import Any

from traceguard.config import DecodeConfig
from traceguard.decode.common import Decoded, StageAttributes
from traceguard.decode.events import SEVERITIES
from traceguard.decode.otlp_json import decode_logs_json, decode_traces_json

KINDS = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


def any_value(value: Any) -> dict:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": "" if value is None else str(value)}


def attributes(pairs) -> list[dict]:
    return [{"key": str(key), "value": any_value(value)} for key, value in pairs]


def pad_trace_id(text: Any) -> Any:
    """64-bit trace ids (16 hex digits, as Jaeger and Zipkin allow) left-padded to 128 bits."""
    return text.rjust(32, "0") if isinstance(text, str) and len(text) == 16 else text


def status_of(tags: dict) -> int:
    code = str(tags.get("otel.status_code", "")).upper()
    if code == "ERROR" or tags.get("error") in (True, "true"):
        return STATUS_ERROR
    return STATUS_OK if code == "OK" else STATUS_UNSET


def micros_to_nanos(value: Any) -> int | None:
    try:
        return int(value) * 1000
    except (TypeError, ValueError):
        return None


class OtlpDocuments:
    """Spans and log records grouped by service, as OTLP/JSON traces and logs documents."""

    def __init__(self) -> None:
        self._spans: dict[str, list[dict]] = {}
        self._logs: dict[str, list[dict]] = {}
        self._malformed = Decoded()

    def malformed(self, message: str) -> None:
        """An element that is not shaped like a span (or trace): rejected alone, the rest is kept."""
        self._malformed.reject(message)

    def decode(self, config: DecodeConfig, stages: StageAttributes | None) -> tuple[Decoded, Decoded]:
        """(spans, logs) through the OTLP/JSON decoder; malformed elements count as rejected spans."""
        spans = decode_traces_json(self.traces(), config, stages)
        spans.rejected += self._malformed.rejected
        spans.errors[:0] = self._malformed.errors
        return spans, decode_logs_json(self.logs(), config)

    def span(self, service: str, span: dict) -> None:
        self._spans.setdefault(service, []).append(span)

    def log(self, service: str, record: dict) -> None:
        self._logs.setdefault(service, []).append(record)

    @staticmethod
    def _resource(service: str) -> dict:
        return {"attributes": attributes([("service.name", service)])}

    def traces(self) -> dict:
        return {"resourceSpans": [{"resource": self._resource(s), "scopeSpans": [{"spans": spans}]}
                                  for s, spans in self._spans.items()]}

    def logs(self) -> dict:
        return {"resourceLogs": [{"resource": self._resource(s), "scopeLogs": [{"logRecords": records}]}
                                 for s, records in self._logs.items()]}

    def log_record(self, trace_id: Any, span_id: Any, time_ns: int, fields: dict) -> dict:
        """A span event/annotation as a log record: body from ``message``/``event``, severity from ``level``."""
        level = str(fields.get("level", "")).lower()
        body = fields.get("message", fields.get("event", fields.get("value", "")))
        return {"timeUnixNano": str(time_ns), "traceId": trace_id, "spanId": span_id,
                "severityNumber": SEVERITIES.get(level, 0), "severityText": level.upper(),
                "body": any_value(body),
                "attributes": attributes((k, v) for k, v in fields.items() if k not in ("message", "level"))}
