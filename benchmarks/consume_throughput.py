"""``traceguard consume`` throughput from a pre-filled topic, against ceilings of the same run.

Writes a scenario (spans only), produces it to a fresh 4-partition topic the
way the Collector's kafka exporter does (one message per trace id, keyed by
it), then measures, interleaved so machine noise hits all alike:

* ceiling_parse: ``ExportTraceServiceRequest.FromString`` over every message value;
* decode_proto: the protobuf decoder to span rows over the same values;
* fetch_only: a kafka-python consumer reading the whole topic, no decode;
* consume: an in-process ``Consumer`` (event time, ``--exit-at-end``, fresh
  group, no output topic) from the first poll until it has caught up and
  committed, every detector on; and with the learned detectors off.

Needs a broker: ``scripts/kafka start`` prints its address.
Run ``python -m benchmarks.consume_throughput --bootstrap HOST:PORT [--traces N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.kafka_feed import create_topics, feed
from benchmarks.scenario import ScenarioConfig, write_scenario
from traceguard.config import load_config
from traceguard.consume import Consumer
from traceguard.decode import decode_traces_proto
from traceguard.decode.common import StageAttributes


def read_topic(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The ``count`` values of the topic, fetched as fast as the client can."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             fetch_max_bytes=16 << 20, receive_message_max_bytes=17 << 20)
    values: list[bytes] = []
    while len(values) < count:
        for messages in consumer.poll(timeout_ms=500).values():
            values.extend(message.value for message in messages)
    consumer.close()
    return values


def consume_rate(bootstrap: str, topic: str, spans: int, learned: bool) -> float:
    config = load_config(None, {
        "consume.bootstrap_servers": bootstrap, "consume.group": f"bench_{uuid.uuid4().hex[:8]}",
        "consume.traces_topic": topic, "consume.logs_topic": "", "consume.anomalies_topic": "",
        "consume.initial_offset": "earliest", "consume.exit_at_end": True, "consume.time": "event",
        "learned.enabled": learned,
    }, environ={})
    consumer = Consumer(config)
    started = time.perf_counter()
    assert consumer.run(threading.Event()) == 0
    elapsed = time.perf_counter() - started
    metrics = consumer.pipeline.metrics
    done = metrics.get("traceguard_spans_accepted_total") + metrics.get("traceguard_late_spans_total")
    assert done == spans, f"consumed {done} of {spans} spans"
    return spans / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        generated = write_scenario(Path(tmp), ScenarioConfig(traces=args.traces, duration_s=args.traces / 3),
                                   proto=True)
        topic = f"bench_spans_{uuid.uuid4().hex[:8]}"
        create_topics(args.bootstrap, {topic: 4})
        messages = feed(args.bootstrap, Path(tmp), topic, None)[topic]
    values = read_topic(args.bootstrap, topic, messages)
    spans = sum(len(ss.spans) for v in values for rs in ExportTraceServiceRequest.FromString(v).resource_spans
                for ss in rs.scope_spans)

    def timed(work) -> float:
        started = time.perf_counter()
        work()
        return spans / (time.perf_counter() - started)

    def parse_only() -> None:
        for value in values:
            ExportTraceServiceRequest.FromString(value)

    def decode_only() -> None:
        stages = StageAttributes()
        config = load_config(None, environ={}).decode
        for value in values:
            decode_traces_proto(value, config, stages)

    rates: dict[str, list[float]] = {name: [] for name in (
        "ceiling_parse", "decode_proto", "fetch_only", "consume", "consume_structural")}
    for _ in range(args.repeats):
        rates["ceiling_parse"].append(timed(parse_only))
        rates["decode_proto"].append(timed(decode_only))
        rates["fetch_only"].append(timed(lambda: read_topic(args.bootstrap, topic, messages)))
        rates["consume"].append(consume_rate(args.bootstrap, topic, spans, learned=True))
        rates["consume_structural"].append(consume_rate(args.bootstrap, topic, spans, learned=False))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps({
        "benchmark": "consume_throughput",
        "python": platform.python_version(),
        "traces": args.traces, "spans": spans, "messages": messages, "partitions": 4,
        "spans_generated": generated.spans,
        "spans_per_s_median": {k: round(v) for k, v in medians.items()},
        "ratio_consume_to_parse": round(medians["consume"] / medians["ceiling_parse"], 4),
        "ratio_consume_structural_to_parse": round(medians["consume_structural"] / medians["ceiling_parse"], 4),
        "ratio_consume_to_decode": round(medians["consume"] / medians["decode_proto"], 4),
        "ratio_fetch_to_parse": round(medians["fetch_only"] / medians["ceiling_parse"], 4),
        "runs": {k: [round(x) for x in v] for k, v in rates.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
