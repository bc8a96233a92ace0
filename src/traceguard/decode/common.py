"""What both OTLP encodings share: the result type, id rules, kept attributes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from traceguard.records import KIND_CLIENT, KIND_CONSUMER, KIND_PRODUCER

Row = TypeVar("Row")

MAX_ERROR_MESSAGES = 5

# Attributes kept on a span row. Reading an attribute costs about as much as
# reading a whole span header, so only the kinds whose detection depends on
# them (is the callee an instrumented service, a database, a broker?) have
# their attributes read at all; SERVER spans carry route/method in their name.
KEPT_ATTRIBUTES = frozenset({
    "db.system", "db.system.name", "messaging.system", "rpc.system", "rpc.method",
    "http.route", "http.response.status_code", "http.status_code",
    "server.address", "peer.service",
})
ATTRIBUTE_KINDS = frozenset({KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER})


class DecodeError(ValueError):
    """The body as a whole cannot be decoded (not the encoding it claims)."""


@dataclass(slots=True)
class Decoded(Generic[Row]):
    """Rows decoded from one body, and what was rejected from it."""

    rows: list[Row] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    def reject(self, message: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERROR_MESSAGES:
            self.errors.append(message)


class AttributeInterner:
    """Shares one tuple among all spans with the same kept attributes.

    Bounded: past ``limit`` distinct tuples it stops sharing (high-cardinality
    values such as ids in ``server.address``) rather than growing.
    """

    __slots__ = ("_seen", "_limit")

    def __init__(self, limit: int = 50_000) -> None:
        self._seen: dict[tuple, tuple] = {}
        self._limit = limit

    def __call__(self, pairs: list[tuple[str, Any]]) -> tuple[tuple[str, Any], ...] | None:
        if not pairs:
            return None
        key = tuple(sorted(pairs))
        shared = self._seen.get(key)
        if shared is not None:
            return shared
        if len(self._seen) < self._limit:
            self._seen[key] = key
        return key


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def intern_name(text: str, limit: int) -> str:
    return sys.intern(text if len(text) <= limit else text[:limit])


def clip_value(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return sys.intern(clip(value, limit))
    return value
