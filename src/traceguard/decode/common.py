"""What both OTLP encodings share: the result type, id rules, kept attributes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Generic, TypeVar

from traceguard.records import KIND_CLIENT, KIND_CONSUMER, KIND_PRODUCER, STATUS_ERROR, STATUS_UNSET, LogRow, SpanRow

Row = TypeVar("Row")

MAX_ERROR_MESSAGES = 5
# service.name of a resource that has none (the SDKs' own default)
UNKNOWN_SERVICE = "unknown_service"
# The resource attributes read: the service, and what names its pod (the first
# of k8s.pod.name and service.instance.id that is set)
RESOURCE_KEYS = frozenset({"service.name", "k8s.pod.name", "service.instance.id"})

# Attributes kept on a span row. Reading an attribute costs about as much as
# reading a whole span header, so only the kinds whose detection depends on
# them (is the callee an instrumented service, a database, a broker?) have
# their attributes read at all; SERVER spans carry route/method in their name.
KEPT_ATTRIBUTES = frozenset({
    "db.system", "db.system.name", "messaging.system", "rpc.system", "rpc.method",
    "http.route", "http.response.status_code", "http.status_code", "rpc.grpc.status_code",
    "server.address", "peer.service",
})
ATTRIBUTE_KINDS = frozenset({KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER})
# Kept, but only on the span that carries them (see StageAttributes).
PER_CALL_ATTRIBUTES = frozenset({"http.response.status_code", "http.status_code", "rpc.grpc.status_code"})
GRPC_STATUS_CODE = "rpc.grpc.status_code"
# The gRPC codes a server reports as its own failure (the semantic conventions:
# UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS);
# the others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's mistake.
GRPC_SERVER_FAILURES = frozenset({2, 4, 12, 13, 14, 15})


def response_code(value: Any) -> int | None:
    """A response code attribute's value as a number: an integer, or a string of
    decimal digits (Zipkin and Jaeger carry every tag as a string)."""
    if value.__class__ is int:
        return value
    if value.__class__ is str and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def response_status(code: int, kind: int, pairs) -> int:
    """The span's status as the semantic conventions define it: an UNSET status
    whose response code says the call failed is ERROR.

    Many instrumentations (and every Jaeger or Zipkin span, whose status is a
    tag) leave the status UNSET and record only the response code: an HTTP
    server answering 500, a client that got 4xx or 5xx, a gRPC call that ended
    UNAVAILABLE. Read as ERROR they count as failures in every detector; an
    explicit OK or ERROR is the instrumentation's own judgement and stays.
    ``pairs`` are the span's (key, value) attributes; a code is an integer or a
    string of decimal digits (Zipkin and Jaeger carry tags as strings). The C
    decoders apply the same rule (``_rows.c``, ``response_failed``).
    """
    if code != STATUS_UNSET:
        return code
    client = kind == KIND_CLIENT
    for key, value in pairs:
        if key.__class__ is not str or key not in PER_CALL_ATTRIBUTES:
            continue
        value = response_code(value)
        if value is None:
            continue
        if key == GRPC_STATUS_CODE:
            failed = value != 0 if client else value in GRPC_SERVER_FAILURES
        else:
            failed = value >= (400 if client else 500)
        if failed:
            return STATUS_ERROR
    return STATUS_UNSET


class DecodeError(ValueError):
    """The body as a whole cannot be decoded (not the encoding it claims)."""


@dataclass(slots=True)
class Decoded(Generic[Row]):
    """Rows decoded from one body, and what was rejected from it."""

    rows: list[Row] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    events: list[LogRow] = field(default_factory=list)  # traces: the spans' events as log records

    def reject(self, message: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERROR_MESSAGES:
            self.errors.append(message)


class StageAttributes:
    """Kept attributes of spans, read once per stage.

    What the kept attributes say (the callee is a database, a broker, this
    peer) is a fact about the stage (service, kind, span name), not about one
    call, so they are read from the stage's first span and shared by its later
    spans: reading attributes costs about as much as the rest of a span. A
    span with an error status is read in full, because its response status
    code tells whether the call reached a server. Bounded: at ``limit``
    stages the cache starts again empty (a flood of new span names must not
    hold their attributes for ever); each entry holds at most one value per
    kept key.
    """

    __slots__ = ("_stages", "_limit")

    def __init__(self, limit: int = 50_000) -> None:
        self._stages: dict[tuple, tuple | None] = {}
        self._limit = limit

    @property
    def known(self) -> dict[tuple, tuple | None]:
        """(service, kind, name) → kept attributes: the cache the C decoder reads directly."""
        return self._stages

    def get(self, service: str, kind: int, name: str, status: int,
            read: Callable[[], list[tuple[str, Any]]]) -> tuple[tuple[str, Any], ...] | None:
        if status == STATUS_ERROR:
            return _freeze(read())
        key = (service, kind, name)
        try:
            return self._stages[key]
        except KeyError:
            attrs = _freeze([(k, v) for k, v in read() if k not in PER_CALL_ATTRIBUTES])
            if len(self._stages) >= self._limit:
                self._stages.clear()
            self._stages[key] = attrs
            return attrs

    def settle(self, pending: list[tuple[SpanRow, int, int, str, list[tuple[str, Any]]]]) -> None:
        """Gives the rows the C decoders left pending, (row, kind, status code, service,
        kept attributes), their attributes: a stage not cached yet, or an error span."""
        for row, kind, code, service, kept in pending:
            row.attrs = self.get(service, kind, row.name, code, lambda kept=kept: kept)  # C made the list: no copy


def _freeze(pairs: list[tuple[str, Any]]) -> tuple[tuple[str, Any], ...] | None:
    """Sorted by key, each key once (its first value): OTLP keys are unique, and a
    span that repeats one must not be kept as many times. Sorted by key alone: a
    key sent twice may carry values of types that do not compare."""
    if not pairs:
        return None
    first: dict[str, Any] = {}
    for key, value in pairs:
        first.setdefault(key, value)
    return tuple(sorted(first.items(), key=itemgetter(0)))


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def intern_name(text: str, limit: int) -> str:
    return sys.intern(text if len(text) <= limit else text[:limit])


def clip_value(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit]
    return value
