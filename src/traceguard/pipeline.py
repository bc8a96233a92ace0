"""The one pipeline every front end wires: assemble → detect → correlate → link → sinks.

Sources push decoded rows in (``accept_spans``, ``accept_logs``) and call
``advance()`` when time may have moved; findings leave through the sinks.
Nothing here knows where rows came from.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, Sequence

from traceguard.assemble import Clock, TraceAssembler
from traceguard.config import PipelineConfig
from traceguard.correlate import IncidentTracker
from traceguard.detect import LateSpan, build
from traceguard.link import LogIndex, link_logs, select_logs
from traceguard.metrics import Metrics
from traceguard.models import Models
from traceguard.models import store as model_store
from traceguard.models.series import StageSeries
from traceguard.records import Anomaly, Incident, LogRow, Span, SpanRow, Trace
from traceguard.sinks import Sink


_NOTHING: frozenset = frozenset()
# Traces decided at a time when the in-flight rest is flushed (shutdown, end of input).
_CLOSING_CHUNK = 1024
# The key of the incident tracker's burst rates among the saved rates (no detector kind is named so).
_BURSTS = "incident_bursts"


class Forward(Protocol):
    """Where a consumer group member sends what it decided, for the group's judge
    (``traceguard.group``) to detect on: the member detects nothing itself."""

    def trace(self, trace: Trace) -> None: ...

    def late(self, anomaly: Anomaly, logs: list[LogRow]) -> None: ...

    def flush(self) -> None:
        """Raises OSError when something did not reach the judge."""


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        clock: Clock,
        sinks: Sequence[Sink],
        metrics: Metrics | None = None,
        models: Models | None = None,
        on_decided: Callable[[Trace], None] | None = None,
        keep_trace: Callable[[Trace, bool], None] | None = None,
        forward: Forward | None = None,
        judging: bool = False,
        series: StageSeries | None = None,
    ) -> None:
        """``models`` starts the learned detectors from saved state instead of from nothing;
        ``on_decided`` hears of each decided trace once its findings are in the sinks
        (the Kafka source commits offsets by it; the replay report samples it);
        ``keep_trace`` of each trace worth keeping for its page: one with findings,
        before them (``exemplar`` false), and an incident's exemplar (true);
        ``forward`` takes each decided trace (with its logs) and late span instead of
        the detectors: the pipeline only assembles, for a group's judge; ``judging``: the
        judge's pipeline, fed decided traces by ``judge()``, whose assembler and log index
        count into metrics of their own (they would double the member's counts and gauges);
        ``series``: where the windowed detectors keep the stages' recent windows for the web
        view, when it must outlive this pipeline (a judge's, behind the member's API)."""
        self.config = config
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._sinks = list(sinks)
        self.models = models or Models.new(config.learned)
        if not clock.deterministic and forward is None:  # live: a refit must not stall decisions (replay stays reproducible)
            self.models.forest.fit_in_background()
        self.series = series or StageSeries(config.ui.series_windows, config.ui.series_stages)
        self._forward = forward
        groups = (build(config, self.models, self.series) if forward is None
                  else {"completeness": [], "timing": [], "every": []})
        self._completeness, self._timing, self._every = groups["completeness"], groups["timing"], groups["every"]
        self._detectors = [*self._completeness, *self._timing, *self._every]
        self._learners = [d for d in self._detectors if hasattr(d, "learn")]
        self._windowed = [d for d in self._detectors if hasattr(d, "advance")]
        self._late = LateSpan()
        self.incidents = IncidentTracker(config.incidents, self._emit_incident,
                                         remember_traces=config.learned.enabled)
        if forward is None:
            pods = self.models.pod_latency
            self.metrics.counted("traceguard_latency_untracked_samples_total",
                                 lambda: self.models.latency.untracked_samples_
                                 + (pods.model.untracked_samples_ if pods is not None else 0))
            self.metrics.counted("traceguard_series_untracked_windows_total", lambda: self.series.untracked_)
            for detector in self._detectors:
                if hasattr(detector, "held_dropped_"):
                    self.metrics.counted(f"traceguard_{detector.kind.value}_held_dropped_total",
                                         lambda d=detector: d.held_dropped_)
                if hasattr(detector, "routine_"):
                    self.metrics.gauge(f"traceguard_{detector.kind.value}_routine_stages",
                                       lambda d=detector: sum(d.routine_.values()))
            self.metrics.gauge("traceguard_incidents_open", lambda: len(self.incidents.open_))
        if self.models.rates:
            self.restore({"detectors": self.models.rates, "bursts": self.models.rates.get(_BURSTS, [])})
        own = Metrics() if judging else self.metrics
        self.logs = LogIndex(config.logs, clock.now, own)
        self.assembler = TraceAssembler(config.assembler, clock, self._on_trace, self._on_late, own,
                                        local=config.serve.scope == "local")
        self._on_decided = on_decided
        self._keep_trace = keep_trace
        self._closed = False
        # advance_detectors' last clock time, None once anything a windowed detector or the
        # incident tracker reads has changed since (a trace, a late span, a finding, a restore)
        self._advanced_at: int | None = None

    def accept_spans(self, rows: Iterable[SpanRow], events: Sequence[LogRow] = ()) -> None:
        """Spans, and their events as log records (in the index before the spans can decide a trace)."""
        if events:
            self.metrics.inc("traceguard_span_events_total", len(events))
            self.logs.add(events)
        self.assembler.add(rows)

    def accept_logs(self, rows: Iterable[LogRow]) -> None:
        self.logs.add(rows)

    def advance(self, limit: int | None = None) -> bool:
        """Decides due traces (at most ``limit``); returns whether more are due."""
        more = self.assembler.advance(limit)
        self.advance_detectors()
        return more

    def judge(self, trace: Trace) -> None:
        """A trace a group member decided (``Forward``): its logs into the index, for
        the stage-level findings' exemplars, then the detectors, as if decided here."""
        if trace.logs:
            self.logs.add(trace.logs)
        self._on_trace(trace)

    def judge_late(self, anomaly: Anomaly, logs: list[LogRow]) -> None:
        """A late span a group member found."""
        self._emit(anomaly, logs)

    def advance_detectors(self) -> None:
        """The windowed detectors' work for the time that passed (the forest scores its
        batch); a judge calls it as the members' watermark moves its clock."""
        now = self._clock.now()
        if now == self._advanced_at:
            # Their work depends on the clock and on what they were given, and neither
            # moved: a second call would find nothing. A replay calls this after each
            # message, logs included, and most messages move neither.
            return
        for detector in self._windowed:
            for anomaly in detector.advance(now):
                self._emit(anomaly, self._logs_of(anomaly))
        self.incidents.advance(now)
        self._advanced_at = now

    def score_batches(self) -> None:
        """The forest scores the decided traces it holds for its next batch now, early:
        for a group's judge that hands over, whose saved state does not hold them."""
        now = self._clock.now()
        for detector in self._windowed:
            if hasattr(detector, "waiting"):
                for anomaly in detector.flush(now):
                    self._emit(anomaly, self._logs_of(anomaly))

    def batched(self) -> int:
        """Decided traces a detector still holds for its batch (the forest's). A model
        snapshot waits until there are none: they are decided, so a replay after a
        crash would not bring them back, and the snapshot does not hold them."""
        return sum(detector.waiting() for detector in self._windowed if hasattr(detector, "waiting"))

    @property
    def closed(self) -> bool:
        return self._closed

    def now(self) -> int:
        """The pipeline clock's time (event-time watermark or wall clock)."""
        return self._clock.now()

    def discard(self, trace_ids: Iterable[bytes]) -> int:
        """Forgets these traces and their logs undecided: the source will deliver them again."""
        trace_ids = list(trace_ids)
        self.logs.drop(trace_ids)
        return self.assembler.discard(trace_ids)

    def flush_sinks(self) -> None:
        """Makes every finding emitted so far durable in the sinks (before a source commits),
        and every decided trace acknowledged by the judge's topic, also after ``close``
        (which flushed and closed the sinks, not the topic's producer)."""
        if not self._closed:
            for sink in self._sinks:
                sink.flush()
        if self._forward is not None:
            self._forward.flush()

    def checkpoint(self) -> dict[str, Any]:
        """The learned state that is cheap to write at every commit, as JSON-ready
        data: the structural detectors' pairing history and the learned trace
        structure. (Latency baselines and forests go into model snapshots.)"""
        return {
            "detectors": {d.kind.value: d.state() for d in self._detectors if hasattr(d, "state")},
            "structure": model_store.structure_state(self.models),
            "bursts": self.incidents.state(),
        }

    def models_for_saving(self) -> Models:
        """The models with the rate detectors' current states in them, and the incident
        tracker's rates of per-trace findings per stage."""
        checkpoint = self.checkpoint()
        self.models.rates = {**checkpoint["detectors"], _BURSTS: checkpoint["bursts"]}
        return self.models

    def restore(self, checkpoint: dict[str, Any]) -> None:
        detectors = checkpoint.get("detectors", {})
        for detector in self._detectors:
            # keyed by kind; checkpoints written before were keyed by class name
            state = detectors.get(detector.kind.value, detectors.get(type(detector).__name__))
            if hasattr(detector, "restore") and state is not None:
                detector.restore(state)
        if "structure" in checkpoint:
            model_store.restore_structure(self.models, checkpoint["structure"])
        if "bursts" in checkpoint:
            self.incidents.restore(checkpoint["bursts"])
        self._advanced_at = None

    def close(self, decide_in_flight: bool = True, deadline: float | None = None) -> int:
        """Decides everything still in flight and settles the learned detectors
        (unless ``decide_in_flight`` is false: a stream processor that stops
        leaves its undecided traces to be read again), then flushes and closes
        the sinks. With a ``deadline`` (``time.monotonic()``), the traces not
        decided by then are dropped and counted; returns how many."""
        if self._closed:
            return 0
        self._closed = True
        abandoned = 0
        if decide_in_flight:
            self._clock.finish()
            self.advance()
            # What is not due yet (wall clock) is decided in chunks with the detectors'
            # work between them, so the deadline bounds that work too: the forest
            # scores (and refits on) what a chunk decided, seconds for 100k traces.
            while self.assembler.traces_in_flight and not abandoned:
                abandoned = self.assembler.flush(deadline, _CLOSING_CHUNK)
                self.advance_detectors()
            now = self._clock.now()
            # Last declared first: a trace still waiting for its forest batch is scored
            # before the latency baselines take in the windows it was decided in.
            for detector in reversed(self._windowed):
                for anomaly in detector.flush(now):
                    self._emit(anomaly, self._logs_of(anomaly))
            self.incidents.flush(now)
        for sink in self._sinks:
            sink.close()
        return abandoned

    def _on_trace(self, trace: Trace) -> None:
        """Completeness checks first; only a complete trace reaches the timing
        checks; what it logged is judged whatever was found; then every learner
        hears what was found in it."""
        if self._forward is not None:
            trace.logs = self.logs.get(trace.trace_id)
            self._forward.trace(trace)
            if self._on_decided is not None:
                self._on_decided(trace)
            return
        trace.logs = self.logs.get(trace.trace_id)
        self._advanced_at = None
        found: list[Anomaly] = []
        for detector in self._completeness:
            found.extend(detector.detect(trace))
        if not found:
            for detector in self._timing:
                found.extend(detector.detect(trace))
        for detector in self._every:
            found.extend(detector.detect(trace))
        if self.incidents.observe(trace) and self._keep_trace is not None and not found:
            self._keep_trace(trace, True)
        flagged = frozenset(anomaly.kind for anomaly in found) if found else _NOTHING
        for learner in self._learners:
            learner.learn(trace, flagged)
        if found:
            if self._keep_trace is not None:
                self._keep_trace(trace, False)
            logs = trace.logs
            for anomaly in found:
                self._emit(anomaly, logs if anomaly.trace_id else self._logs_of(anomaly), trace)
        if self._on_decided is not None:
            self._on_decided(trace)

    def _logs_of(self, anomaly: Anomaly) -> list[LogRow]:
        """The trace's logs, or for a stage-level finding its exemplars' logs."""
        if anomaly.trace_id:
            return self.logs.get(bytes.fromhex(anomaly.trace_id))
        return [log for exemplar in anomaly.exemplars for log in self.logs.get(bytes.fromhex(exemplar))]

    def _emit_incident(self, incident: Incident) -> None:
        logs = [log for exemplar in incident.exemplars[:3] for log in self.logs.get(bytes.fromhex(exemplar))]
        incident.logs = select_logs(logs, self.config.logs.max_linked)
        self.metrics.inc("traceguard_incident_updates_total", state=incident.state)
        for sink in self._sinks:
            sink.emit_incident(incident)

    def _on_late(self, trace_id: bytes, span: Span, decided_at: int) -> None:
        anomaly = self._late.detect_late(trace_id, span, decided_at, self._clock.now())
        if self._forward is not None:
            self._forward.late(anomaly, self.logs.get(trace_id))
            return
        self._emit(anomaly, self.logs.get(trace_id))

    def _emit(self, anomaly: Anomaly, logs: list[LogRow], trace: Trace | None = None) -> None:
        """Through the incident tracker, which may keep a per-trace finding on its incident instead."""
        self._advanced_at = None
        if not self.incidents.route(anomaly, trace):
            self.metrics.inc("traceguard_findings_attached_total", kind=anomaly.kind.value)
            return
        link_logs(anomaly, logs, self.config.logs.max_linked)
        self.metrics.inc("traceguard_anomalies_total", kind=anomaly.kind.value, service=anomaly.service or "")
        for sink in self._sinks:
            sink.emit(anomaly)
