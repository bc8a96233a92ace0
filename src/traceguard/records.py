"""The data contract between stages: span rows, traces, log rows, anomalies.

Nothing here decides anything. Span rows are what a decoder emits and the
assembler buffers, so they are kept compact (see ``SpanRow``); ``Span`` and
``Trace`` are the expanded, read-only view that detectors see once a trace is
decided; ``Anomaly`` is the public output contract (DESIGN.md, "Findings").
"""

from __future__ import annotations

import struct
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OTLP enum values (opentelemetry/proto/trace/v1/trace.proto).
KIND_UNSPECIFIED, KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = range(6)
# Not an OTLP kind: the stage of a call's network path (a CLIENT span's time
# outside its callee's SERVER span), judged as a stage of the callee.
KIND_NETWORK = 6
KIND_NAMES = ("unspecified", "internal", "server", "client", "producer", "consumer", "network")
STATUS_UNSET, STATUS_OK, STATUS_ERROR = range(3)

# Bits of ``SpanRow`` flags.
FLAG_HAS_LINKS = 1

# Layout of ``SpanRow.core``: span id, parent span id (zeros for a root),
# start time, kind, status code, flags.
SPAN_CORE = struct.Struct("<8s8sQBBB")
NO_PARENT = bytes(8)
_START = struct.Struct("<Q")  # SPAN_CORE's start, at offset 16


class SpanRow:
    """One span as buffered while its trace is in flight.

    Memory per buffered span is the bound that matters most, so the fixed-size
    fields are packed into one ``bytes`` (``SPAN_CORE``); ``end`` stays a plain
    int because the assembler reads it for every span (event time). ``service``
    and ``name`` are interned strings and ``attrs`` an interned tuple of
    ``(key, value)`` pairs, so rows of one stage share them. ``instance`` is the
    pod the span came from (its resource's ``k8s.pod.name``, else
    ``service.instance.id``; interned, or None), which names a pod that differs
    from its service's others.
    """

    __slots__ = ("trace_id", "core", "end", "service", "name", "attrs", "instance")

    def __init__(
        self,
        trace_id: bytes,
        core: bytes,
        end: int,
        service: str,
        name: str,
        attrs: tuple[tuple[str, Any], ...] | None,
        instance: str | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.core = core
        self.end = end
        self.service = service
        self.name = name
        self.attrs = attrs
        self.instance = instance

    @property
    def start(self) -> int:
        return _START.unpack_from(self.core, 16)[0]


class Span:
    """Expanded span of a decided trace, the view detectors work on."""

    __slots__ = (
        "span_id", "parent_span_id", "start", "end", "kind", "status",
        "has_links", "service", "name", "attrs", "finished", "instance",
    )

    def __init__(
        self,
        span_id: bytes,
        parent_span_id: bytes | None,
        start: int,
        end: int,
        kind: int,
        status: int,
        has_links: bool,
        service: str,
        name: str,
        attrs: tuple[tuple[str, Any], ...] | None,
        instance: str | None = None,
    ) -> None:
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.start = start
        self.end = end
        self.kind = kind
        self.status = status
        self.has_links = has_links
        self.service = service
        self.name = name
        self.attrs = attrs
        #: an end time that is set and not before the start
        self.finished = end > 0 and end >= start
        self.instance = instance

    def attr(self, key: str) -> Any:
        for k, v in self.attrs or ():
            if k == key:
                return v
        return None


DecisionReason = Literal["quiet", "max_age", "evicted", "flush"]


class Trace:
    """A decided trace: its spans in arrival order plus the indexes every
    structural detector needs, built once instead of once per detector.
    ``orphans`` are the spans whose parent is not in the trace; ``derived``
    caches values computed from the trace once for several detectors."""

    __slots__ = ("trace_id", "spans", "by_id", "children", "orphans", "root", "reason", "decided_at", "first_seen",
                 "derived", "logs")

    def __init__(
        self,
        trace_id: bytes,
        spans: list[Span],
        by_id: dict[bytes, Span],
        children: dict[bytes, list[Span]],
        orphans: list[Span],
        root: Span | None,
        reason: DecisionReason,
        decided_at: int,
        first_seen: int,
    ) -> None:
        self.trace_id = trace_id
        self.spans = spans
        self.by_id = by_id
        self.children = children
        self.orphans = orphans
        self.root = root
        self.reason = reason
        self.decided_at = decided_at
        self.first_seen = first_seen
        self.derived: dict[str, Any] = {}
        self.logs: list[LogRow] = []  # its log records (and span events) when it was decided: set by the pipeline


SEVERITY_ERROR = 17  # OTLP SeverityNumber ERROR


class LogRow:
    """One log record, as held by the log index until its trace is decided."""

    __slots__ = ("trace_id", "span_id", "time", "severity_number", "severity_text", "body", "service")

    def __init__(
        self,
        trace_id: bytes,
        span_id: bytes | None,
        time: int,
        severity_number: int,
        severity_text: str,
        body: str,
        service: str,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.time = time
        self.severity_number = severity_number
        self.severity_text = severity_text
        self.body = body
        self.service = service


_STATUS_NAMES = ("unset", "ok", "error")


def trace_view(trace: Trace, max_spans: int) -> dict[str, Any]:
    """A decided trace as the trace page shows it (JSON-ready): its first
    ``max_spans`` spans with their kept attributes, and its logs and span events."""
    return {
        "trace_id": trace.trace_id.hex(),
        "decided_at": trace.decided_at,
        "spans_total": len(trace.spans),
        "spans": [{
            "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex() if s.parent_span_id else None,
            "service": s.service, "name": s.name, "kind": KIND_NAMES[s.kind], "status": _STATUS_NAMES[s.status],
            "start": s.start, "end": s.end, "attributes": {k: v for k, v in s.attrs or ()},
        } for s in trace.spans[:max_spans]],
        "logs": [{  # the fields of a finding's LinkedLog, so one view shows both
            "time_unix_nano": r.time, "span_id": r.span_id.hex() if r.span_id else None, "service": r.service,
            "severity_number": r.severity_number, "severity_text": r.severity_text, "body": r.body,
        } for r in (trace.logs or ())[:max_spans]],
    }


class AnomalyKind(StrEnum):
    MISSING_PARENT = "missing_parent"
    MISSING_ROOT = "missing_root"
    UNFINISHED_SPAN = "unfinished_span"
    CONTEXT_OUTLIVED_PARENT = "context_outlived_parent"
    LATE_SPAN = "late_span"
    UNPAIRED_CLIENT_SPAN = "unpaired_client_span"
    MISSING_EXPECTED_SPAN = "missing_expected_span"
    LATENCY_REGRESSION = "latency_regression"
    SLOW_STAGE = "slow_stage"
    TRACE_OUTLIER = "trace_outlier"
    ERROR_REGRESSION = "error_regression"
    LOG_ANOMALY = "log_anomaly"


Severity = Literal["info", "warning", "critical"]


class LinkedLog(BaseModel):
    """A log record linked to a finding through its trace id."""

    model_config = ConfigDict(frozen=True)

    time_unix_nano: int
    span_id: str | None
    service: str
    severity_number: int
    severity_text: str
    body: str


class Anomaly(BaseModel):
    """One finding; also the JSONL line format (field order is the contract)."""

    id: str
    kind: AnomalyKind
    trace_id: str | None = Field(pattern=r"^[0-9a-f]{32}$")
    span_id: str | None = Field(pattern=r"^[0-9a-f]{16}$")
    service: str | None
    operation: str | None
    event_time: int
    detected_at: int
    severity: Severity
    score: float
    summary: str
    evidence: dict[str, Any]
    exemplars: list[str] = Field(default_factory=list)
    incident_id: str | None = None
    logs: list[LinkedLog] = Field(default_factory=list)


IncidentState = Literal["open", "resolved"]


class IncidentStage(BaseModel):
    """One stage of an incident: a culprit (its own behaviour changed) or an affected caller."""

    service: str
    operation: str
    span_kind: str
    signal: str = Field(description="what changed: latency, outlived_parent, calls_dropped (culprits); "
                                    "caller (affected stages)")
    magnitude: float = Field(description="culprits: current/baseline; callers: traces seen through them")
    finding_id: str | None = None
    instance: str | None = Field(
        None, description="culprits: the pod (k8s.pod.name, else service.instance.id) whose calls changed while the "
                          "service's other pods' did not; null when they changed alike or fewer than two pods report",
    )


class Incident(BaseModel):
    """One fault: the stage-level changes it caused and the per-trace findings it explains.

    Written again (same ``id``) at every state change; the last version wins.
    """

    id: str
    state: IncidentState
    service: str
    operation: str
    onset: int = Field(description="unix ns: the end of the first affected sample")
    opened_at: int
    updated_at: int
    resolved_at: int | None = None
    severity: Severity
    summary: str
    culprits: list[IncidentStage]
    affected: list[IncidentStage] = Field(default_factory=list)
    attached: dict[str, int] = Field(default_factory=dict, description="per-trace findings explained, by kind")
    finding_ids: list[str] = Field(default_factory=list, description="its stage-level findings and exemplar findings")
    exemplars: list[str] = Field(default_factory=list)
    logs: list[LinkedLog] = Field(default_factory=list)
