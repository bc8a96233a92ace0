"""The one pipeline every front end wires: assemble → detect → link → sinks.

Sources push decoded rows in (``accept_spans``, ``accept_logs``) and call
``advance()`` when time may have moved; findings leave through the sinks.
Nothing here knows where rows came from.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from traceguard.assemble import Clock, TraceAssembler
from traceguard.config import PipelineConfig
from traceguard.detect import LateSpan, completeness_detectors, learned_detectors
from traceguard.link import LogIndex, link_logs
from traceguard.metrics import Metrics
from traceguard.models import Models
from traceguard.records import Anomaly, LogRow, Span, SpanRow, Trace
from traceguard.sinks import Sink


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        clock: Clock,
        sinks: Sequence[Sink],
        metrics: Metrics | None = None,
        models: Models | None = None,
    ) -> None:
        """``models`` starts the learned detectors from saved state instead of from nothing."""
        self.config = config
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._sinks = list(sinks)
        self.models = models or Models.new(config.learned)
        self._completeness = completeness_detectors(config.structural)
        self._timing = []
        if config.learned.enabled:
            learned_completeness, self._timing = learned_detectors(self.models, config.learned)
            self._completeness += learned_completeness
        self._learners = [d for d in (*self._completeness, *self._timing) if hasattr(d, "learn")]
        self.metrics.gauge("traceguard_latency_untracked_samples", lambda: self.models.latency.untracked_samples_)
        self._late = LateSpan()
        self.logs = LogIndex(config.logs, clock.now, self.metrics)
        self.assembler = TraceAssembler(config.assembler, clock, self._on_trace, self._on_late, self.metrics)
        self._closed = False

    def accept_spans(self, rows: Iterable[SpanRow]) -> None:
        self.assembler.add(rows)

    def accept_logs(self, rows: Iterable[LogRow]) -> None:
        self.logs.add(rows)

    def advance(self, limit: int | None = None) -> bool:
        """Decides due traces (at most ``limit``); returns whether more are due."""
        more = self.assembler.advance(limit)
        now = self._clock.now()
        for learner in self._learners:
            for anomaly in learner.advance(now):
                self._emit(anomaly, self._logs_of(anomaly))
        return more

    def close(self) -> None:
        """Decides everything still in flight, settles the learned detectors,
        then flushes and closes the sinks."""
        if self._closed:
            return
        self._closed = True
        self._clock.finish()
        self.advance()
        self.assembler.flush()
        now = self._clock.now()
        for learner in self._learners:
            for anomaly in learner.flush(now):
                self._emit(anomaly, self._logs_of(anomaly))
        for sink in self._sinks:
            sink.close()

    def _on_trace(self, trace: Trace) -> None:
        """Completeness checks first; only a complete trace reaches the timing
        checks, and only a trace nothing flagged teaches the learned ones."""
        found: list[Anomaly] = []
        for detector in self._completeness:
            found.extend(detector.detect(trace))
        if not found:
            for detector in self._timing:
                found.extend(detector.detect(trace))
        if not found:
            for learner in self._learners:
                learner.learn(trace)
            return
        logs = self.logs.get(trace.trace_id)
        for anomaly in found:
            self._emit(anomaly, logs if anomaly.trace_id else self._logs_of(anomaly))

    def _logs_of(self, anomaly: Anomaly) -> list[LogRow]:
        """The trace's logs, or for a stage-level finding its exemplars' logs."""
        if anomaly.trace_id:
            return self.logs.get(bytes.fromhex(anomaly.trace_id))
        return [log for exemplar in anomaly.exemplars for log in self.logs.get(bytes.fromhex(exemplar))]

    def _on_late(self, trace_id: bytes, span: Span, decided_at: int) -> None:
        anomaly = self._late.detect_late(trace_id, span, decided_at, self._clock.now())
        self._emit(anomaly, self.logs.get(trace_id))

    def _emit(self, anomaly: Anomaly, logs: list[LogRow]) -> None:
        link_logs(anomaly, logs, self.config.logs.max_linked)
        self.metrics.inc("traceguard_anomalies_total", kind=anomaly.kind.value, service=anomaly.service or "")
        for sink in self._sinks:
            sink.emit(anomaly)
