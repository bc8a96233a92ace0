"""A scenario's OTLP protobuf files rewritten as Jaeger JSON and Zipkin v2 JSON.

What the target format can express is kept: Jaeger gets span kinds and errors
as tags, links as FOLLOWS_FROM references, and a span's log records as its
span logs (level and message); Zipkin gets kinds, error tags, and log bodies
as annotations. Log records without a span id, resource attributes beyond
service.name, and export order are lost in both. Times become microseconds.

Run ``python -m benchmarks.export_formats --scenario DIR`` (a directory written with --proto).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.kafka_feed import read_length_prefixed

KIND_NAMES = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(any_value):
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


def _spans(scenario: Path):
    """(service, span) in file order."""
    for request in read_length_prefixed(scenario / "traces.pb", ExportTraceServiceRequest):
        for resource in request.resource_spans:
            service = next((_value(a.value) for a in resource.resource.attributes if a.key == "service.name"),
                           "unknown_service")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    yield service, span


def _logs_by_span(scenario: Path) -> dict[tuple[bytes, bytes], list]:
    logs = defaultdict(list)
    for request in read_length_prefixed(scenario / "logs.pb", ExportLogsServiceRequest):
        for resource in request.resource_logs:
            for scope in resource.scope_logs:
                for record in scope.log_records:
                    if record.span_id:
                        logs[(record.trace_id, record.span_id)].append(record)
    return logs


def _tags(span) -> dict:
    tags = {a.key: _value(a.value) for a in span.attributes}
    tags["span.kind"] = KIND_NAMES.get(span.kind, "internal")
    if span.status.code == 2:
        tags["error"] = True
        tags["otel.status_code"] = "ERROR"
    elif span.status.code == 1:
        tags["otel.status_code"] = "OK"
    return tags


def _micros(nanos: int) -> int:
    return nanos // 1000


def to_jaeger(scenario: Path) -> dict:
    logs = _logs_by_span(scenario)
    traces: dict[bytes, dict] = {}
    processes: dict[bytes, dict[str, str]] = defaultdict(dict)  # trace → service → process id
    for service, span in _spans(scenario):
        trace = traces.setdefault(span.trace_id, {"traceID": span.trace_id.hex(), "spans": [], "processes": {}})
        pid = processes[span.trace_id].setdefault(service, f"p{len(processes[span.trace_id]) + 1}")
        trace["processes"][pid] = {"serviceName": service, "tags": []}
        references = [{"refType": "CHILD_OF", "traceID": span.trace_id.hex(), "spanID": span.parent_span_id.hex()}] \
            if span.parent_span_id else []
        references += [{"refType": "FOLLOWS_FROM", "traceID": link.trace_id.hex(), "spanID": link.span_id.hex()}
                       for link in span.links]
        end = span.end_time_unix_nano
        trace["spans"].append({
            "traceID": span.trace_id.hex(), "spanID": span.span_id.hex(), "operationName": span.name,
            "references": references, "startTime": _micros(span.start_time_unix_nano),
            # an invalid end stays invalid: a negative duration, or none for an end of 0
            "duration": _micros(end) - _micros(span.start_time_unix_nano) if end else None,
            "tags": [{"key": k, "type": "string", "value": v} for k, v in _tags(span).items()],
            "logs": [{"timestamp": _micros(r.time_unix_nano),
                      "fields": [{"key": "level", "type": "string", "value": r.severity_text.lower()},
                                 {"key": "message", "type": "string", "value": _value(r.body)}]}
                     for r in logs.get((span.trace_id, span.span_id), ())],
            "processID": pid,
        })
    return {"data": list(traces.values())}


def to_zipkin(scenario: Path) -> list:
    logs = _logs_by_span(scenario)
    spans = []
    for service, span in _spans(scenario):
        tags = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in _tags(span).items()}
        kind = tags.pop("span.kind")
        end = span.end_time_unix_nano
        item = {"traceId": span.trace_id.hex(), "id": span.span_id.hex(), "name": span.name,
                "timestamp": _micros(span.start_time_unix_nano),
                "duration": _micros(end) - _micros(span.start_time_unix_nano) if end else None,
                "localEndpoint": {"serviceName": service}, "tags": tags,
                "annotations": [{"timestamp": _micros(r.time_unix_nano), "value": _value(r.body)}
                                for r in logs.get((span.trace_id, span.span_id), ())]}
        if span.parent_span_id:
            item["parentId"] = span.parent_span_id.hex()
        if kind != "internal":
            item["kind"] = kind.upper()
        spans.append(item)
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, required=True)
    args = parser.parse_args()
    (args.scenario / "jaeger.json").write_text(json.dumps(to_jaeger(args.scenario)))
    (args.scenario / "zipkin.json").write_text(json.dumps(to_zipkin(args.scenario)))


if __name__ == "__main__":
    main()
