"""Span events as log records.

Many services log through their spans, not through OTLP logs: Go's logging
bridges and ``span.AddEvent`` write a line as an event, and every SDK's
``RecordError`` / ``record_exception`` writes an ``exception`` event with
``exception.type``, ``exception.message`` and ``exception.stacktrace``. Each
event becomes a ``LogRow`` of its span, so it joins the log index like an
OTLP log record (bounded the same way) and every finding on the trace
carries it, whichever front end the span came in through.
"""

from __future__ import annotations

from typing import Any, Iterable

from traceguard.records import SEVERITY_ERROR, LogRow, SpanRow

# the attribute holding the line of a logging event, most specific first
_MESSAGE_KEYS = ("log.message", "message", "msg", "event", "body")
_LEVEL_KEYS = ("log.severity", "level", "severity", "log.level")
# event names that only say "a log line": the body is the message alone
_GENERIC_NAMES = frozenset({"", "log", "message", "event", "log.record"})
# log levels as the OTel SDK's logging bridge maps them
SEVERITIES = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "warning": 13, "error": 17, "fatal": 21,
              "critical": 21}


def event_logs(row: SpanRow, events: Iterable[tuple[int, str, dict[str, Any]]], body_limit: int) -> list[LogRow]:
    """Log records of a span's events, given as (time, name, attributes)."""
    span_id = row.core[:8]
    return [_event_log(row, span_id, time, name, attributes, body_limit) for time, name, attributes in events]


def _event_log(row: SpanRow, span_id: bytes, time: int, name: str, attributes: dict[str, Any],
              body_limit: int) -> LogRow:
    """The log record of one event of ``row``'s span. An exception's body is
    "type: message", then its stack trace on the following lines; severity is
    ERROR for an exception, else what a level attribute says (0 when none)."""
    if name == "exception":
        head = ": ".join(str(part) for part in (attributes.get("exception.type"),
                                                attributes.get("exception.message")) if part) or "exception"
        stack = attributes.get("exception.stacktrace")
        body = f"{head}\n{stack}" if stack else head
        severity, severity_text = SEVERITY_ERROR, "ERROR"
    else:
        message = next((value for key in _MESSAGE_KEYS
                        if isinstance(value := attributes.get(key), str) and value), None)
        body = name if message is None else message if name in _GENERIC_NAMES else f"{name}: {message}"
        level = next((value for key in _LEVEL_KEYS if isinstance(value := attributes.get(key), str)), "")
        severity, severity_text = SEVERITIES.get(level.lower(), 0), level.upper()
    return LogRow(row.trace_id, span_id, time or row.end, severity, severity_text,
                  body if len(body) <= body_limit else body[:body_limit], row.service)

