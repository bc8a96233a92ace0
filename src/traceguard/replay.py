"""The replay front end: files → pipeline, driven by event time.

Same input, same output, byte for byte: the clock is the event-time watermark,
``detected_at`` comes from it, and every order is deterministic.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig
from traceguard.metrics import Metrics
from traceguard.models import Models
from traceguard.models.series import StageSeries
from traceguard.pipeline import Pipeline
from traceguard.records import Trace
from traceguard.sinks import Sink
from traceguard.sources.replay import replay_batches


class ReplayAborted(Exception):
    """``--strict`` and a corrupt or rejected input; the message names file and line."""


@dataclass
class ReplayResult:
    metrics: Metrics
    models: Models
    series: StageSeries
    corrupt: int
    rejected: int


def run_replay(
    trace_paths: Sequence[Path],
    log_paths: Sequence[Path],
    config: PipelineConfig,
    sinks: Sequence[Sink],
    *,
    strict: bool = False,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    on_batch: Callable[[int], None] | None = None,
    models: Models | None = None,
    fmt: str = "auto",
    keep_trace: Callable[[Trace, bool], None] | None = None,
) -> ReplayResult:
    """Replays the files through one pipeline and closes it; ``models`` starts
    the learned detectors from saved state; ``keep_trace`` hears of each trace
    worth keeping (``Pipeline``'s: the report keeps their spans).

    Raises:
        FileNotFoundError: a named file does not exist.
        ReplayAborted: ``strict`` and a problem in the input.
        WrongFormat: ``fmt`` is not the format of a file.
    """
    for path in (*trace_paths, *log_paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such file: {path}")
    clock = EventTimeClock(config.assembler.allowed_lateness, config.assembler.max_ahead)
    pipeline = Pipeline(config, clock, sinks, models=models, keep_trace=keep_trace)
    metrics = pipeline.metrics
    corrupt = rejected = 0
    try:
        for batch in replay_batches(list(map(Path, trace_paths)), list(map(Path, log_paths)), config.decode, fmt):
            if batch.out_of_order:
                warn(f"{batch.where}: {'; '.join(batch.errors)}")
                metrics.inc("traceguard_replay_out_of_order_total", batch.out_of_order)
                continue
            if batch.corrupt or batch.rejected:
                what = "corrupt, skipped" if batch.corrupt else f"{batch.rejected} record(s) rejected"
                message = f"{batch.where}: {what}: {'; '.join(batch.errors)}"
                if strict:
                    raise ReplayAborted(message)
                warn(message)
                if batch.corrupt:
                    corrupt += 1
                    metrics.inc("traceguard_replay_corrupt_total")
                    continue
                rejected += batch.rejected
                metrics.inc(f"traceguard_{'spans' if batch.signal == 'traces' else 'logs'}_rejected_total", batch.rejected,
                            transport="file")
            if batch.signal == "traces":
                pipeline.accept_spans(batch.rows, batch.events)
            else:
                pipeline.accept_logs(batch.rows)
            pipeline.advance()
            if on_batch is not None:
                on_batch(len(batch.rows))
    finally:
        pipeline.close()
    return ReplayResult(metrics, pipeline.models_for_saving(), pipeline.series, corrupt, rejected)
