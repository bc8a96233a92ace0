"""Scenario traffic into Kafka the way the Collector's kafka exporter writes it.

Reads a scenario written with ``write_scenario(..., proto=True)`` and produces
each export request split per trace id, keyed by the lowercase hex trace id
(``partition_traces_by_id`` / ``partition_logs_by_trace_id``), encoded as
``otlp_proto`` or ``otlp_json``. The replay files and the topics then hold
the same data, which is what the consume tests compare.

Run ``python -m benchmarks.kafka_feed --bootstrap HOST:PORT --scenario DIR``.
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path
from typing import Iterator

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.scenario import otlp_json


def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
    finally:
        admin.close()


def committed(bootstrap: str, group: str) -> int:
    """Offsets the group has committed, summed over its partitions (0 before it has any)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return sum(meta.offset for meta in admin.list_consumer_group_offsets(group).values() if meta.offset > 0)
    except KafkaError:  # no coordinator yet on a fresh broker: nothing committed
        return 0
    finally:
        admin.close()


def read_length_prefixed(path: Path, message_type) -> Iterator:
    with open(path, "rb") as stream:
        while prefix := stream.read(4):
            (length,) = struct.unpack(">I", prefix)
            yield message_type.FromString(stream.read(length))


def split_by_trace(request) -> list[tuple[str, object]]:
    """One request per trace id, each keeping its resource and scope, in first-seen order."""
    traces = isinstance(request, ExportTraceServiceRequest)
    by_trace: dict[bytes, tuple[object, dict]] = {}
    resources = request.resource_spans if traces else request.resource_logs
    for r_index, resource in enumerate(resources):
        scopes = resource.scope_spans if traces else resource.scope_logs
        for s_index, scope in enumerate(scopes):
            for item in (scope.spans if traces else scope.log_records):
                part, groups = by_trace.setdefault(item.trace_id, (type(request)(), {}))
                group = groups.get((r_index, s_index))
                if group is None:
                    target = part.resource_spans.add() if traces else part.resource_logs.add()
                    target.resource.CopyFrom(resource.resource)
                    target.schema_url = resource.schema_url
                    group = target.scope_spans.add() if traces else target.scope_logs.add()
                    group.scope.CopyFrom(scope.scope)
                    group.schema_url = scope.schema_url
                    groups[(r_index, s_index)] = group
                (group.spans if traces else group.log_records).add().CopyFrom(item)
    return [(trace_id.hex(), part) for trace_id, (part, _) in by_trace.items()]


def encode(message, encoding: str) -> bytes:
    return message.SerializeToString() if encoding == "otlp_proto" else otlp_json(message).encode()


def feed(bootstrap: str, scenario: Path, traces_topic: str, logs_topic: str | None,
         encoding: str = "otlp_proto", extra: list[tuple[str, bytes | None, bytes]] = (),
         compression: str | None = None) -> dict[str, int]:
    """Produces the scenario (traces, then logs interleaved in file order); returns messages per topic.

    ``extra``: (topic, key, value) records produced first (poison records in tests).
    Idempotent, one request in flight: a batch retried after a produce error (a
    loaded broker) must not land after the batches sent behind it, or the topic
    would hold the traffic in another order than the file (and event-time
    decisions would differ from a replay of it).
    """
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50, batch_size=1 << 20,
                             max_request_size=8 << 20, compression_type=compression, enable_idempotence=True,
                             max_in_flight_requests_per_connection=1)
    counts = {traces_topic: 0, logs_topic: 0}
    for topic, key, value in extra:
        producer.send(topic, key=key, value=value)
        counts[topic] = counts.get(topic, 0) + 1
    sources = [(traces_topic, scenario / "traces.pb", ExportTraceServiceRequest)]
    if logs_topic:
        sources.append((logs_topic, scenario / "logs.pb", ExportLogsServiceRequest))
    for topic, path, message_type in sources:
        for request in read_length_prefixed(path, message_type):
            for key, part in split_by_trace(request):
                producer.send(topic, key=key.encode(), value=encode(part, encoding))
                counts[topic] += 1
    producer.flush()
    producer.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--scenario", type=Path, required=True, help="a directory written with --proto")
    parser.add_argument("--traces-topic", default="otlp_spans")
    parser.add_argument("--logs-topic", default="otlp_logs")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--encoding", default="otlp_proto", choices=("otlp_proto", "otlp_json"))
    args = parser.parse_args()
    create_topics(args.bootstrap, {args.traces_topic: args.partitions, args.logs_topic: args.partitions})
    print(feed(args.bootstrap, args.scenario, args.traces_topic, args.logs_topic, args.encoding))


if __name__ == "__main__":
    main()
