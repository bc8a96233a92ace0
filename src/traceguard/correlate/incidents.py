"""Incidents: one record per fault, above the findings it explains.

A stage-level change (a ``latency_regression``, a rise of a stage's
outlived-parent rate, a stage that stopped making a call: any stage-level
finding whose ``evidence.signal`` is set) opens an incident, or joins the open
one it belongs to. So does a burst of per-trace findings blaming one stage
(``slow_stage``, ``trace_outlier`` led by the stage's time,
``context_outlived_parent`` on the stage, ``log_anomaly`` on the span that
logged the rare line), which comes before a windowed test can be sure. Joining follows
the call graph seen in the traces of the open incident:

- a stage that calls a culprit (an ancestor in those traces) and stopped
  making a call, or writes a log line far more often (it logs the failure it
  passed up), is explained by its child: it is listed as *affected*, not as
  a culprit (a caller whose own self time rose is a culprit of its own: self
  time excludes the time spent in children);
- a change on a stage that a culprit calls (a descendant) is the deeper
  cause: it becomes the culprit ranked first, and the culprits that call it
  become affected;
- a change on another stage of a culprit's service is the same fault (a CPU
  or memory fault slows every operation of a process): a further culprit;
- the network path into a service (``KIND_NETWORK``: a call's time outside
  its callee's span) is explained by its calling service when that service
  has a change of its own (a starved process reads its responses late): it is
  affected, and the caller's stage leads.

While an incident is open, the per-trace findings it explains — a slow span
of a culprit stage, a trace outlier led by a culprit stage (or led by its
duration, through a culprit that got slower), an outlived context on a
culprit stage, a missing call a culprit stopped making, a rare log line of
the failing service or in a trace through its failing stage (a caller
logging the failure it was passed up) — carry its ``incident_id``, are
counted on it, and only the first ``exemplar_findings`` of them go to the
sinks: the on-call engineer gets one incident, not one
finding per request.
Where the culprit stage's service runs on several pods (``k8s.pod.name`` or
``service.instance.id`` on its spans), the traces seen through it while the
incident is open are counted per pod; a culprit names the pod whose median
time (failure rate, for failures) is ``pod_ratio`` times every other pod's:
the fault is that pod's, and restarting or draining it is the remedy.
An incident resolves when all its stage-level changes have resolved and no
finding came for ``quiet``. Every state change is written again under the
same id (the last version wins), as stage-level findings are.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter, OrderedDict, deque
from typing import Callable

from traceguard.config import IncidentConfig
from traceguard.detect.base import times, utc
from traceguard.models.chance import poisson_sf
from traceguard.models.features import callee_of, latency_keys, latency_samples, network_parts, stages
from traceguard.records import (KIND_NAMES, KIND_NETWORK, STATUS_ERROR, Anomaly, AnomalyKind, Incident, IncidentStage,
                                Span, Trace)

Stage = tuple[str, str, int]

# Per-trace kinds an incident explains when the trace passes through its culprit.
EXPLAINED = frozenset({AnomalyKind.SLOW_STAGE, AnomalyKind.TRACE_OUTLIER, AnomalyKind.MISSING_EXPECTED_SPAN,
                       AnomalyKind.CONTEXT_OUTLIVED_PARENT, AnomalyKind.LOG_ANOMALY})
_SIGNAL_WORDS = {
    "latency": "self time rose",
    "slow_spans": "a burst of slow calls",
    "outlived_parent": "children keep running after it ends more often",
    "calls_dropped": "stopped making a call it makes",
    "errors": "its own failed calls rose",
    "log_template": "a burst of log lines it (almost) never writes",
    "log_rate": "writes a log line far more often than usual",
}
_SLOWER = frozenset({"latency", "slow_spans"})
_BURST_SIGNALS = {AnomalyKind.SLOW_STAGE: "slow_spans", AnomalyKind.TRACE_OUTLIER: "slow_spans",
                  AnomalyKind.CONTEXT_OUTLIVED_PARENT: "outlived_parent", AnomalyKind.LOG_ANOMALY: "log_template"}
_LOGGED = frozenset({"errors", "log_template", "log_rate"})
# Changes a caller shows because of a culprit below it: a call it stopped making
# (it gave up), a log line it writes more often (it logs the failure it passed up).
_EXPLAINED_BY_CHILD = frozenset({"calls_dropped", "log_rate"})
_EXEMPLARS = 5
# Stage sets of recently decided traces, for findings that come after their
# trace was decided (the forest scores in batches of at most forest.batch).
_RECENT_TRACES = 4096
_OBSERVE_ALL, _OBSERVE_EVERY = 500, 16
# Per culprit: the pods compared, and the latest times kept of each.
_MAX_PODS, _POD_TIMES = 64, 256


class _PodCalls:
    """A culprit stage's calls on one pod, seen while the incident is open."""

    __slots__ = ("calls", "failed", "times")

    def __init__(self) -> None:
        self.calls = 0
        self.failed = 0
        self.times: deque[int] = deque(maxlen=_POD_TIMES)


class _Culprit:
    __slots__ = ("stage", "signal", "magnitude", "finding_id", "open", "dropped", "pods")

    def __init__(self, stage: Stage, signal: str, magnitude: float, finding_id: str | None, open_: bool,
                 dropped: Stage | None = None) -> None:
        self.stage, self.signal, self.magnitude, self.finding_id, self.open = stage, signal, magnitude, finding_id, open_
        self.dropped = dropped  # calls_dropped: the call the stage stopped making
        self.pods: dict[str, _PodCalls] = {}

    def count(self, pod: str, failed: bool, time: int | None) -> None:
        calls = self.pods.get(pod)
        if calls is None:
            if len(self.pods) >= _MAX_PODS:
                return
            calls = self.pods[pod] = _PodCalls()
        calls.calls += 1
        calls.failed += failed
        if time is not None:
            calls.times.append(time)

    def odd_pod(self, min_calls: int, ratio: float) -> str | None:
        """The pod whose calls changed while the service's other pods' did not, if one did."""
        pods = {pod: calls for pod, calls in self.pods.items() if calls.calls >= min_calls}
        if len(pods) < 2:
            return None
        if self.signal == "errors":
            rates = {pod: calls.failed / calls.calls for pod, calls in pods.items()}
            worst = max(rates, key=lambda pod: (rates[pod], pod))
            others = [calls for pod, calls in pods.items() if pod != worst]
            # the others' pooled rate, one failure added: a pod is not odd against a rate of zero by chance
            others_rate = (sum(c.failed for c in others) + 1) / (sum(c.calls for c in others) + 1)
            return worst if pods[worst].failed >= 5 and rates[worst] >= ratio * others_rate else None
        if self.signal in _SLOWER:
            medians = {pod: statistics.median(calls.times) for pod, calls in pods.items()
                       if len(calls.times) >= min_calls}
            if len(medians) < 2:
                return None
            worst = max(medians, key=lambda pod: (medians[pod], pod))
            rest = max(median for pod, median in medians.items() if pod != worst)
            return worst if medians[worst] >= ratio * max(rest, 1) else None
        return None


class _Open:
    """An open incident and what it has seen."""

    def __init__(self, id_: str, onset: int, now: int) -> None:
        self.id = id_
        self.onset = onset
        self.opened_at = now
        self.culprits: list[_Culprit] = []
        self.callers: Counter = Counter()   # stage -> traces seen through it, above a culprit
        self.below: dict[Stage, set[Stage]] = {}  # culprit stage -> the stages it calls, however deep
        self.caller_changes: dict[Stage, tuple[str, str]] = {}  # affected stages that changed: signal, finding id
        self.attached: Counter = Counter()
        self.finding_ids: list[str] = []
        self.exemplars: list[str] = []
        self.last_evidence = now            # pipeline time of the last change or attached finding
        self.last_event = onset             # event time of the same
        self.resolved_at: int | None = None
        self.closed = False
        self.emitted_at = -1
        self.dirty = True
        self.observed = 0                   # traces through a culprit seen so far

    def stages(self) -> set[Stage]:
        return {c.stage for c in self.culprits}

    def calls(self, stage: Stage) -> bool:
        """Whether a current culprit calls ``stage``: a change there joins this incident. A
        culprit demoted to affected no longer counts (a later fault below a caller that only
        passed the first one up is another fault)."""
        return any(stage in self.below.get(c.stage, ()) for c in self.culprits)

    def ever_called(self, stage: Stage) -> bool:
        """Whether any stage that was a culprit of this incident calls ``stage``: a change
        there, in this incident, is deeper in the fault's call graph and leads."""
        return any(stage in called for called in self.below.values())

    def measure(self, trace: Trace, culprits: set[Stage]) -> list[tuple[Span, Stage]]:
        """The trace's spans of the culprit stages with their culprit's stage, each counted on
        its culprit's pod (a network culprit's pod is its callee's: a delayed network to a pod
        is that pod's)."""
        measured = []
        by_stage = {c.stage: c for c in self.culprits if c.stage in culprits}
        times = None
        for i, (span, key) in enumerate(zip(trace.spans, latency_keys(trace))):
            culprit = by_stage.get(key) or by_stage.get((span.service, span.name, span.kind))
            if culprit is None:
                continue
            measured.append((span, culprit.stage))
            pod = span.instance
            if key[2] == KIND_NETWORK and culprit.stage == key:
                callee = callee_of(span, trace.children)
                pod = callee.instance if callee is not None else None
            if pod is not None:
                times = times if times is not None else latency_samples(trace)  # the latency detectors' already
                culprit.count(pod, span.status == STATUS_ERROR, times[i])
        return measured


class IncidentTracker:
    """Groups findings into incidents; ``emit`` receives each incident state change."""

    def __init__(self, config: IncidentConfig, emit: Callable[[Incident], None], *,
                 remember_traces: bool = True) -> None:
        """``remember_traces``: keep the stages of recent traces for findings that come
        after their trace was decided (the forest's); off when no such detector runs."""
        self.config = config
        self._emit = emit
        self._remember = remember_traces
        self.open_: list[_Open] = []
        self._bursts: dict[Stage, deque] = {}
        # stage -> (per-trace findings blaming it that no incident explained, when the first came)
        self._blamed: dict[Stage, tuple[int, int]] = {}
        self._recent: OrderedDict[str, list[Stage]] = OrderedDict()  # trace id -> its latency keys
        self._swept = 0  # when stale bursts were last dropped

    # -- findings in -----------------------------------------------------------
    def route(self, anomaly: Anomaly, trace: Trace | None = None) -> bool:
        """Sets ``anomaly.incident_id`` where an incident explains it; returns
        whether the finding itself still goes to the sinks."""
        if anomaly.trace_id is None:
            signal = anomaly.evidence.get("signal")
            state = anomaly.evidence.get("state")
            if signal and state in ("open", "resolved"):
                self._stage_change(anomaly, signal, state == "open")
            return True
        if anomaly.kind not in EXPLAINED:
            return True
        present = latency_keys(trace) if trace is not None else self._recent.get(anomaly.trace_id)
        for incident in self.open_:
            if _explains(incident, anomaly, present):
                return self._attach(incident, anomaly)
        stage = _blamed_stage(anomaly)
        if stage is not None:
            self._burst(anomaly, stage, _BURST_SIGNALS[anomaly.kind])
        return True

    def observe(self, trace: Trace) -> bool:
        """Every decided trace: its stages are remembered for a while; while
        incidents are open, who calls the culprits and whom they call. Returns
        whether the trace became an exemplar of an incident (its spans are worth keeping)."""
        if self._remember:
            recent = self._recent
            recent[trace.trace_id.hex()] = latency_keys(trace)  # made by the latency detectors already
            if len(recent) > _RECENT_TRACES:
                recent.popitem(last=False)
        if not self.open_:
            return False
        exemplar = False
        for incident in self.open_:
            culprits = incident.stages()
            # network culprits are seen only in latency keys, which cost more to make
            culprits = culprits.intersection(
                latency_keys(trace) if any(c[2] == KIND_NETWORK for c in culprits) else stages(trace))
            if not culprits:
                continue
            # The call graph around the culprits is known after a few hundred
            # traces through them; later ones are sampled.
            incident.observed += 1
            if incident.observed > _OBSERVE_ALL and incident.observed % _OBSERVE_EVERY:
                continue
            by_id = trace.by_id
            callers: set[Stage] = set()
            measured = incident.measure(trace, culprits)
            for span, _ in measured:
                parent = by_id.get(span.parent_span_id) if span.parent_span_id else None
                while parent is not None:
                    callers.add((parent.service, parent.name, parent.kind))
                    parent = by_id.get(parent.parent_span_id) if parent.parent_span_id else None
            for span, culprit in measured:
                below, called = [span], incident.below.setdefault(culprit, set())
                while below:  # every stage under the culprit, however deep
                    for child in trace.children.get(below.pop().span_id, ()):
                        called.add((child.service, child.name, child.kind))
                        below.append(child)
            for caller in callers - culprits:
                if caller in incident.callers or len(incident.callers) < self.config.max_affected:
                    incident.callers[caller] += 1
            if len(incident.exemplars) < _EXEMPLARS:
                incident.exemplars.append(trace.trace_id.hex())
                incident.dirty = True  # the stored incident lists it (its spans are kept for its page)
                if len(incident.exemplars) == 1:
                    incident.emitted_at = -1  # the first one is written at once: the incident page links it
                exemplar = True
        return exemplar

    # -- state -----------------------------------------------------------------
    def state(self) -> list[list]:
        """What bursts are judged against (each stage's count of findings blaming it and
        when the first came), JSON-ready: a restart must not forget a stage's heavy tail."""
        return [[*stage, count, first] for stage, (count, first) in self._blamed.items()]

    def restore(self, rows: list[list]) -> None:
        self._blamed = {(service, operation, kind): (count, first) for service, operation, kind, count, first in rows}

    # -- time ------------------------------------------------------------------
    def advance(self, now: int) -> None:
        for incident in list(self.open_) if self.open_ else ():
            quiet = now - incident.last_evidence >= self.config.quiet
            if quiet and not any(c.open for c in incident.culprits):
                incident.resolved_at = max(incident.resolved_at or 0, incident.last_event)
                incident.closed = True
                self.open_.remove(incident)
                self._write(incident, now)
            elif incident.dirty and now - incident.emitted_at >= self.config.update_interval:
                self._write(incident, now)
        if self._bursts and now - self._swept >= self.config.burst_window:
            self._swept = now
            horizon = now - self.config.burst_window
            for stage in [s for s, q in self._bursts.items() if not q or q[-1][0] < horizon]:
                del self._bursts[stage]

    def flush(self, now: int) -> None:
        """End of input: incidents still open are written as they stand (they stay open)."""
        for incident in self.open_:
            if incident.dirty:
                self._write(incident, now)

    # -- internals -------------------------------------------------------------
    def _stage_change(self, anomaly: Anomaly, signal: str, opened: bool) -> None:
        stage = (anomaly.service or "", anomaly.operation or "", KIND_NAMES.index(anomaly.evidence["stage_kind"]))
        magnitude = float(anomaly.evidence.get("magnitude", 1.0))
        now = anomaly.detected_at
        if not opened:
            for incident in self.open_:
                for culprit in incident.culprits:
                    if culprit.finding_id == anomaly.id:
                        culprit.open = False
                        incident.resolved_at = max(incident.resolved_at or 0,
                                                   anomaly.evidence.get("resolved_at_unix_nano") or now)
                        anomaly.incident_id = incident.id
                        incident.dirty = True
                        return
                if anomaly.id in incident.finding_ids:
                    anomaly.incident_id = incident.id
                    return
            return
        incident = self._incident_for(stage, signal)
        if incident is None:
            if len(self.open_) >= self.config.max_open:
                return
            incident = self._new(stage, anomaly.event_time, now)
        anomaly.incident_id = incident.id
        if anomaly.id not in incident.finding_ids:
            incident.finding_ids.append(anomaly.id)
        incident.onset = min(incident.onset, anomaly.event_time) if incident.culprits else anomaly.event_time
        incident.last_evidence, incident.last_event = now, max(incident.last_event, anomaly.event_time)
        incident.dirty = True
        explained = (signal in _EXPLAINED_BY_CHILD and stage in incident.callers) or (
            network_parts(stage) is not None and any(c.stage[0] == network_parts(stage)[1] for c in incident.culprits))
        if explained and stage not in incident.stages():
            incident.caller_changes[stage] = (signal, anomaly.id)
            incident.callers[stage] += 0
            self._write(incident, now)
            return
        missing = anomaly.evidence.get("missing_stage")
        dropped = (missing["service"], missing["operation"], KIND_NAMES.index(missing["kind"])) if missing else None
        for culprit in incident.culprits:
            if culprit.stage == stage and culprit.signal in (signal, "slow_spans") and culprit.dropped == dropped:
                culprit.signal, culprit.magnitude, culprit.finding_id, culprit.open = signal, magnitude, anomaly.id, True
                break
        else:
            incident.culprits.append(_Culprit(stage, signal, magnitude, anomaly.id, True, dropped))
        if incident.ever_called(stage) and network_parts(stage) is None:
            self._deepen(incident, stage)
        self._demote_networks_of(incident, stage[0])
        self._write(incident, now)

    def _demote_networks_of(self, incident: _Open, service: str) -> None:
        """Network culprits whose calls come from ``service``, now a culprit itself, are affected."""
        if network_parts(incident.culprits[0].stage) is None and all(network_parts(c.stage) is None
                                                                   for c in incident.culprits):
            return
        explained = [c for c in incident.culprits
                     if network_parts(c.stage) is not None and network_parts(c.stage)[1] == service]
        if not explained or len(explained) == len(incident.culprits):
            return
        for culprit in explained:
            incident.caller_changes[culprit.stage] = (culprit.signal, culprit.finding_id or "")
            incident.callers[culprit.stage] += 0
        incident.culprits = [c for c in incident.culprits if c not in explained]

    def _incident_for(self, stage: Stage, signal: str) -> _Open | None:
        """The open incident a change on ``stage`` belongs to, by the rules in the module doc."""
        explained_by_child = signal in _EXPLAINED_BY_CHILD
        network = network_parts(stage)
        caller = network[1] if network is not None else None
        for test in (lambda i: stage in i.stages(),
                     lambda i: caller is not None and any(c.stage[0] == caller for c in i.culprits),
                     lambda i: caller is None and any(network_parts(c.stage) is not None
                                                      and network_parts(c.stage)[1] == stage[0] for c in i.culprits),
                     lambda i: explained_by_child and stage in i.callers,
                     lambda i: i.calls(stage), lambda i: any(c.stage[0] == stage[0] for c in i.culprits)):
            for incident in self.open_:
                if test(incident):
                    return incident
        return None

    def _deepen(self, incident: _Open, stage: Stage) -> None:
        """``stage`` is called by culprits: it leads, and its callers among the culprits are affected."""
        lead = [c for c in incident.culprits if c.stage == stage]
        callers = [c for c in incident.culprits if c.stage != stage and c.stage[0] != stage[0]]
        for caller in callers:
            incident.caller_changes[caller.stage] = (caller.signal, caller.finding_id or "")
            incident.callers[caller.stage] += 0
        incident.culprits = lead + [c for c in incident.culprits if c not in lead and c not in callers]

    def _new(self, stage: Stage, onset: int, now: int) -> _Open:
        digest = hashlib.sha256(f"incident|{stage[0]}|{stage[1]}|{stage[2]}|{onset}".encode()).hexdigest()[:32]
        incident = _Open(digest, onset, now)
        self.open_.append(incident)
        return incident

    def _attach(self, incident: _Open, anomaly: Anomaly) -> bool:
        anomaly.incident_id = incident.id
        incident.attached[anomaly.kind.value] += 1
        incident.last_evidence = anomaly.detected_at
        incident.last_event = max(incident.last_event, anomaly.event_time)
        incident.dirty = True
        exemplar = sum(incident.attached.values()) <= self.config.exemplar_findings
        if exemplar:
            incident.finding_ids.append(anomaly.id)
        return exemplar

    def _burst(self, anomaly: Anomaly, stage: Stage, signal: str) -> None:
        """Per-trace timing findings blaming one stage, ``burst`` of them within
        ``burst_window``: the stage changed before a windowed test can be sure.
        Unless the stage has always had them: requests that are slow now and
        then for their own reasons (a heavy tail, a retry) come together by
        chance every few hours, so a burst counts only when the stage's own
        rate of such findings so far would make one by chance rarer than once
        in ``burst_by_chance``. (A window slides: at rate r, bursts of k within
        w start about r · P(Poisson(r · w) ≥ k − 1) times per unit of time.)"""
        recent = self._bursts.get(stage)
        if recent is None:
            if len(self._bursts) >= self.config.max_open * 10:
                return
            recent = self._bursts[stage] = deque(maxlen=self.config.burst)
        recent.append((anomaly.detected_at, anomaly.event_time, anomaly.id, _magnitude(anomaly)))
        count, first = self._blamed.get(stage, (0, anomaly.detected_at))
        if count or len(self._blamed) < self.config.max_open * 10:
            self._blamed[stage] = (count + 1, first)
        window = self.config.outlived_burst_window if signal == "outlived_parent" else self.config.burst_window
        if len(recent) < self.config.burst or recent[-1][0] - recent[0][0] > window:
            return
        if len(self.open_) >= self.config.max_open:
            return
        before, history = count - (len(recent) - 1), recent[0][0] - first
        if before > 0 and history > 0:
            rate = before / history
            if rate * poisson_sf(len(recent) - 2, rate * window) * self.config.burst_by_chance > 1:
                return
        del self._bursts[stage]
        incident = self._incident_for(stage, signal)
        if incident is None:
            incident = self._new(stage, min(e for _, e, _, _ in recent), anomaly.detected_at)
        incident.onset = min(incident.onset, *(e for _, e, _, _ in recent))
        if stage not in incident.stages():
            incident.culprits.append(_Culprit(stage, signal, round(max(m for *_, m in recent), 3), None, False))
        incident.finding_ids.extend(i for _, _, i, _ in recent if i not in incident.finding_ids)
        anomaly.incident_id = incident.id
        incident.last_evidence, incident.last_event = anomaly.detected_at, anomaly.event_time
        if incident.ever_called(stage):
            self._deepen(incident, stage)
        self._write(incident, anomaly.detected_at)

    def _write(self, incident: _Open, now: int) -> None:
        incident.emitted_at, incident.dirty = now, False
        self._emit(_record(incident, now, self.config))


def _magnitude(anomaly: Anomaly) -> float:
    """How many times its normal the blamed stage's time was (median of the
    baseline); for an outlived context, how many times the tolerance it overran."""
    evidence = anomaly.evidence
    if anomaly.kind is AnomalyKind.SLOW_STAGE:
        return evidence["self_time_ms"] / max(evidence["baseline_p50_ms"], 1e-3)
    if anomaly.kind is AnomalyKind.CONTEXT_OUTLIVED_PARENT:
        return evidence["overrun_ms"] / max(evidence["tolerance_ms"], 1e-3)
    feature = (evidence.get("features") or [{}])[0]
    return feature.get("value", 1.0) / max(feature.get("median", 1.0), 1e-3)


def _blamed_stage(anomaly: Anomaly) -> Stage | None:
    """The stage a per-trace finding is about: a slow_stage's own, a
    trace_outlier's most deviating stage (none when a whole-trace feature leads),
    the parent stage a context outlived, the stage whose span logged a rare line."""
    evidence = anomaly.evidence
    if anomaly.kind is AnomalyKind.SLOW_STAGE:
        return anomaly.service or "", anomaly.operation or "", KIND_NAMES.index(evidence["stage_kind"])
    if anomaly.kind is AnomalyKind.TRACE_OUTLIER:
        stage = (evidence.get("features") or [{}])[0].get("stage")
        return (stage["service"], stage["operation"], KIND_NAMES.index(stage["kind"])) if stage else None
    if anomaly.kind is AnomalyKind.CONTEXT_OUTLIVED_PARENT:
        return evidence["parent_service"], evidence["parent_operation"], KIND_NAMES.index(evidence["parent_kind"])
    if anomaly.kind is AnomalyKind.LOG_ANOMALY:
        return anomaly.service or "", anomaly.operation or "", KIND_NAMES.index(evidence["stage_kind"])
    return None


def _explains(incident: _Open, anomaly: Anomaly, present: list[Stage] | None) -> bool:
    """Whether the incident's change accounts for this per-trace finding: a slow
    span of a culprit stage, a trace unlike its normal ones through a slow
    culprit (or led by a culprit stage), a rise of outliving on a culprit
    stage, a missing call a culprit stopped making, a rare log line of a service
    whose failures rose or of a trace through its failing stage. ``present``: the trace's
    latency keys, where every slower culprit's stage would be."""
    culprits = incident.culprits
    if anomaly.kind is AnomalyKind.LOG_ANOMALY:
        # a rare line of a service that fails or logs a burst of them, or of a trace
        # through such a culprit: a caller logging the failure it was passed up
        services = {template["service"] for template in anomaly.evidence["templates"]}
        return any(c.signal in _LOGGED and (c.stage[0] in services or (present is not None and c.stage in present))
                   for c in culprits)
    if anomaly.kind is AnomalyKind.MISSING_EXPECTED_SPAN:
        missing = {(m["service"], m["operation"]) for m in anomaly.evidence["missing_stages"]}
        return any(c.dropped is not None and c.dropped[:2] in missing for c in culprits)
    blamed = _blamed_stage(anomaly)
    if anomaly.kind is AnomalyKind.CONTEXT_OUTLIVED_PARENT:
        return any(c.signal == "outlived_parent" and c.stage == blamed for c in culprits)
    if blamed is not None:
        # a slower culprit: the stage itself, another stage of its process, or a
        # network path into or out of its service
        network = network_parts(blamed)
        services = {blamed[0], network[1]} if network is not None else {blamed[0]}
        return any(c.signal in _SLOWER and (c.stage == blamed or c.stage[0] in services) for c in culprits)
    # a trace_outlier led by its duration or shape: through a culprit that got slower
    return present is not None and any(c.signal in _SLOWER and c.stage in present for c in culprits)


def _record(incident: _Open, now: int, config: IncidentConfig) -> Incident:
    lead = incident.culprits[0]
    service, operation, _ = lead.stage
    pods = [c.odd_pod(config.pod_min_calls, config.pod_ratio) for c in incident.culprits]
    callers = sorted(incident.callers.items(), key=lambda item: (-item[1], item[0]))
    affected = [
        IncidentStage(service=s, operation=o, span_kind=KIND_NAMES[k],
                      signal=incident.caller_changes.get((s, o, k), ("caller",))[0], magnitude=float(n),
                      finding_id=incident.caller_changes.get((s, o, k), (None, None))[1] or None)
        for (s, o, k), n in callers
    ]
    resolved = incident.closed
    explained = sum(incident.attached.values())
    others = len(incident.culprits) - 1
    summary = (
        f"{service} '{operation}': {_SIGNAL_WORDS.get(lead.signal, lead.signal)} ({times(lead.magnitude)})"
        + (f" on pod {pods[0]}" if pods[0] else "") + f" since {utc(incident.onset)}"
        + (f", with {others} more stage{'s' if others > 1 else ''} of the same cause" if others else "")
        + (f"; {explained} per-trace findings explained" if explained else "")
        + (f"; callers affected: {', '.join(f'{s} {o!r}' for (s, o, _), _ in callers[:3])}" if callers else "")
        + ("; resolved." if resolved else ".")
    )
    return Incident(
        id=incident.id,
        state="resolved" if resolved else "open",
        service=service,
        operation=operation,
        onset=incident.onset,
        opened_at=incident.opened_at,
        updated_at=now,
        resolved_at=incident.resolved_at if resolved else None,
        severity="critical" if max(c.magnitude for c in incident.culprits) >= 2 else "warning",
        summary=summary,
        culprits=[IncidentStage(service=c.stage[0], operation=c.stage[1], span_kind=KIND_NAMES[c.stage[2]],
                                signal=c.signal, magnitude=c.magnitude, finding_id=c.finding_id, instance=pod)
                  for c, pod in zip(incident.culprits, pods)],
        affected=affected,
        attached=dict(sorted(incident.attached.items())),
        finding_ids=incident.finding_ids[:50],
        exemplars=incident.exemplars,
    )
