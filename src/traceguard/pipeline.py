"""The one pipeline every front end wires: assemble → detect → link → sinks.

Sources push decoded rows in (``accept_spans``, ``accept_logs``) and call
``advance()`` when time may have moved; findings leave through the sinks.
Nothing here knows where rows came from.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from traceguard.assemble import Clock, TraceAssembler
from traceguard.config import PipelineConfig
from traceguard.detect import LateSpan, TraceDetector, structural_detectors
from traceguard.link import LogIndex, link_logs
from traceguard.metrics import Metrics
from traceguard.records import Anomaly, LogRow, Span, SpanRow, Trace
from traceguard.sinks import Sink


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        clock: Clock,
        sinks: Sequence[Sink],
        metrics: Metrics | None = None,
        detectors: Sequence[TraceDetector] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._sinks = list(sinks)
        self.detectors = list(detectors) if detectors is not None else structural_detectors(config.structural)
        self._late = LateSpan()
        self.logs = LogIndex(config.logs, clock.now, self.metrics)
        self.assembler = TraceAssembler(config.assembler, clock, self._on_trace, self._on_late, self.metrics)
        self._closed = False

    def accept_spans(self, rows: Iterable[SpanRow]) -> None:
        self.assembler.add(rows)

    def accept_logs(self, rows: Iterable[LogRow]) -> None:
        self.logs.add(rows)

    def advance(self) -> None:
        self.assembler.advance()

    def close(self) -> None:
        """Decides everything still in flight, then flushes and closes the sinks."""
        if self._closed:
            return
        self._closed = True
        self._clock.finish()
        self.assembler.advance()
        self.assembler.flush()
        for sink in self._sinks:
            sink.close()

    def _on_trace(self, trace: Trace) -> None:
        found: list[Anomaly] = []
        for detector in self.detectors:
            found.extend(detector.detect(trace))
        if found:
            logs = self.logs.get(trace.trace_id)
            for anomaly in found:
                self._emit(anomaly, logs)

    def _on_late(self, trace_id: bytes, span: Span, decided_at: int) -> None:
        anomaly = self._late.detect_late(trace_id, span, decided_at, self._clock.now())
        self._emit(anomaly, self.logs.get(trace_id))

    def _emit(self, anomaly: Anomaly, logs: list[LogRow]) -> None:
        link_logs(anomaly, logs, self.config.logs.max_linked)
        self.metrics.inc("traceguard_anomalies_total", kind=anomaly.kind.value, service=anomaly.service or "")
        for sink in self._sinks:
            sink.emit(anomaly)
