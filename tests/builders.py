"""Small builders for hand-made traces: OTLP protobuf requests and span rows."""

from __future__ import annotations

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from traceguard.config import AssemblerConfig, PipelineConfig
from traceguard.records import KIND_INTERNAL, NO_PARENT, SPAN_CORE, SpanRow

MS = 1_000_000
T0 = 1_767_225_600 * 1_000_000_000


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def row(trace: int, span: int, parent: int | None = None, *, start_ms: float = 0, end_ms: float | None = 10,
        kind: int = KIND_INTERNAL, status: int = 0, links: bool = False, service: str = "svc",
        name: str = "op", attrs: tuple | None = None) -> SpanRow:
    """A span row; ``end_ms=None`` means an end time of 0 (never validly ended)."""
    start = T0 + int(start_ms * MS)
    end = 0 if end_ms is None else T0 + int(end_ms * MS)
    core = SPAN_CORE.pack(sid(span), sid(parent) if parent else NO_PARENT, start, kind, status, int(links))
    return SpanRow(tid(trace), core, end, service, name, attrs)


def traces_request(*spans: dict, service: str = "svc") -> ExportTraceServiceRequest:
    """An OTLP request with one resource; each dict holds Span fields (attributes as a plain dict)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    kv = resource_spans.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", service
    scope = resource_spans.scope_spans.add()
    for fields in spans:
        fields = dict(fields)
        attributes = fields.pop("attributes", {})
        status = fields.pop("status", None)
        links = fields.pop("links", 0)
        span = scope.spans.add(**fields)
        if status is not None:
            span.status.code = status
        for _ in range(links):
            span.links.add(trace_id=tid(99), span_id=sid(99))
        for key, value in attributes.items():
            attribute = span.attributes.add(key=key)
            if isinstance(value, str):
                attribute.value.string_value = value
            else:
                attribute.value.int_value = value
    return request


def logs_request(*records: dict, service: str = "svc") -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    kv = resource_logs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", service
    scope = resource_logs.scope_logs.add()
    for fields in records:
        fields = dict(fields)
        body = fields.pop("body", "")
        record = scope.log_records.add(**fields)
        record.body.string_value = body
    return request


def config(**assembler) -> PipelineConfig:
    return PipelineConfig(assembler=AssemblerConfig(**assembler)) if assembler else PipelineConfig()


def decide(*rows):
    """The decided Trace the assembler builds from these rows."""
    from traceguard.assemble import EventTimeClock, TraceAssembler
    from traceguard.metrics import Metrics

    out = []
    assembler = TraceAssembler(AssemblerConfig(), EventTimeClock(0), out.append, lambda *a: None, Metrics())
    assembler.add(rows)
    assembler.flush()
    (trace,) = out
    return trace
