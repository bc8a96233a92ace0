"""What log template mining costs: replay with and without it, and drain3 per line.

Writes the scenario with its logs (OTLP/JSON lines: spans, log records and
span events), then, interleaved in one process so machine noise hits both
alike, replays it with every detector and with ``learned.templates.enabled``
off (everything else the same, error rates included). Also mines every log
line of the scenario once through ``TemplateModel`` alone (masking and
drain3) for its cost per line. Prints JSON with medians and the ratio.

    .venv/bin/python -m benchmarks.log_templates [--traces 8000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.scenario import ScenarioConfig, write_scenario
from traceguard.config import PipelineConfig
from traceguard.models.templates import TemplateModel
from traceguard.replay import run_replay
from traceguard.runtime import tune_gc
from traceguard.sinks import JsonlSink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = PipelineConfig()
    without = config.model_copy(update={"learned": config.learned.model_copy(update={
        "templates": config.learned.templates.model_copy(update={"enabled": False})})})
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_scenario(directory, ScenarioConfig(traces=args.traces, seed=7, duration_s=args.traces / 2))
        traces, logs = directory / "traces.jsonl", directory / "logs.jsonl"
        tune_gc()

        def replay(settings: PipelineConfig) -> tuple[float, dict]:
            started = time.perf_counter()
            with open(os.devnull, "w") as devnull:
                result = run_replay([traces], [logs], settings, [JsonlSink(devnull)], warn=lambda _: None)
            return time.perf_counter() - started, result.metrics.snapshot()

        seconds: dict[str, list[float]] = {"with_templates": [], "without_templates": []}
        metrics: dict = {}
        for _ in range(args.repeats):
            elapsed, metrics = replay(config)
            seconds["with_templates"].append(elapsed)
            seconds["without_templates"].append(replay(without)[0])
        lines = [(log.service, log.body) for log in _logs(directory, config)]
        model = TemplateModel(config.learned.templates, config.learned.alert_rate)
        started = time.perf_counter()
        for service, body in lines:
            model.template(service, body)
        mining = time.perf_counter() - started
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(json.dumps({
        "benchmark": "log_templates", "traces": args.traces,
        "log_lines": len(lines), "span_events": metrics.get("traceguard_span_events_total", 0),
        "templates": sum(len(t.miner.clusters) for t in model.services_.values()),
        "replay_seconds_median": {k: round(v, 3) for k, v in medians.items()},
        "throughput_ratio_with_to_without": round(medians["without_templates"] / medians["with_templates"], 4),
        "mining_us_per_line": round(mining / max(len(lines), 1) * 1e6, 2),
        "runs": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
    }, indent=2))


def _logs(directory: Path, config: PipelineConfig):
    """Every log record of the scenario and every span event, as the pipeline indexes them."""
    from traceguard.sources.replay import replay_batches

    for batch in replay_batches([directory / "traces.jsonl"], [directory / "logs.jsonl"], config.decode):
        yield from batch.events if batch.signal == "traces" else batch.rows


if __name__ == "__main__":
    main()
