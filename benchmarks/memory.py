"""Python heap per span in flight, measured with tracemalloc.

Decodes the scenario's traffic (512-span OTLP protobuf requests) into a
pipeline whose decision wait is longer than the scenario, so every span stays
in flight, and divides the traced heap (rows, assembler indexes, decided-id
memory — everything allocated after the requests were serialized) by the
spans held. Run ``python -m benchmarks.memory [--traces N]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import tracemalloc

from benchmarks.common import scenario_requests
from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig
from traceguard.decode import decode_traces_proto
from traceguard.decode.common import StageAttributes
from traceguard.pipeline import Pipeline
from traceguard.sinks import MemorySink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=20_000)
    args = parser.parse_args()
    bodies = [r.SerializeToString() for r in scenario_requests(args.traces)]
    config = PipelineConfig.model_validate({"assembler": {
        "decision_wait": "100h", "max_trace_age": "100h",
        "max_spans_in_flight": 10_000_000, "max_traces_in_flight": 10_000_000,
    }})

    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    pipeline = Pipeline(config, EventTimeClock(config.assembler.allowed_lateness, config.assembler.max_ahead), [MemorySink()])
    stages = StageAttributes()
    for body in bodies:
        pipeline.accept_spans(decode_traces_proto(body, config.decode, stages).rows)
        pipeline.advance()
    held = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    spans = pipeline.assembler.spans_in_flight
    traces = pipeline.assembler.traces_in_flight
    print(json.dumps({
        "benchmark": "memory_per_span_in_flight",
        "traces_in_flight": traces, "spans_in_flight": spans,
        "traced_bytes": held,
        "bytes_per_span": round(held / spans, 1),
        "target_bytes_per_span": 300,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
