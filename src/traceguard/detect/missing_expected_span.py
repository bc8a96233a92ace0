"""``missing_expected_span``: a stage (almost) every normal trace of this root operation has is absent.

One finding per trace, on its root span, listing every absent stage but
those whose caller gave up in this trace (a handler whose call failed skips
the calls after it; failures have their own kind, ``error_regression``).
Every
complete trace (rooted, no orphan, no span lost) teaches the model, flagged
or not: a model that learned only from unflagged traces could never learn
that a stage is legitimately absent in 5 % of requests, and would flag every
one of them forever. Traces that lost spans stay out: their absences are
the lost spans.

Stage-level: each parent stage learns the share of its calls that make each
child call it normally makes (counted on a quarter of the traces) (``models.rates``, direction down). When a stage
stops making a call it made in most of its calls (a handler that returns
early, a cache that stopped missing), a stage-level finding opens with
``evidence.signal = "calls_dropped"`` and the parent stage as the culprit:
its own code changed what it does. Optional calls have their own rates and
are judged against them.
"""

from __future__ import annotations

from traceguard.config import StructuralConfig
from traceguard.detect.base import answered, finding, rate_change_finding
from traceguard.models.rates import RateChange, RateModel
from traceguard.models.structure import StructureModel
from traceguard.records import KIND_CLIENT, KIND_NAMES, STATUS_ERROR, Anomaly, AnomalyKind, Trace

# A call is expected of a parent stage, and its absence judged, once it is made
# in at least this share of the stage's calls.
_EXPECTED_CALL_RATE = 0.5
# Call rates are counted on one trace in this many (by trace id, so replays agree):
# a rate needs samples, not every trace, and counting is the costly part.
_CALL_SAMPLE = 4
# Kinds that say a span of the trace was lost or broke: its absences are not evidence.
_LOST_SPANS = frozenset({AnomalyKind.MISSING_ROOT, AnomalyKind.MISSING_PARENT, AnomalyKind.UNFINISHED_SPAN,
                         AnomalyKind.UNPAIRED_CLIENT_SPAN})


def _gave_up(trace: Trace) -> set[tuple]:
    """Stages of the spans in this trace that failed and so did not make their
    remaining calls: a span whose failure came from a child that failed (a
    handler whose retries all failed), or the root. A span that failed with
    no failed child in the trace may have lost that child (a span that never
    arrived): its absent calls are still evidence. A client call that a server
    answered did reach its callee, whose spans should be there."""
    failed = [s for s in trace.spans if s.status == STATUS_ERROR]
    if not failed:
        return set()
    children, root = trace.children, trace.root
    return {(s.service, s.name, s.kind) for s in failed
            if not (s.kind == KIND_CLIENT and answered(s))
            and (s is root or any(c.status == STATUS_ERROR for c in children.get(s.span_id, ())))}


class MissingExpectedSpan:
    kind = AnomalyKind.MISSING_EXPECTED_SPAN

    def __init__(self, model: StructureModel, config: StructuralConfig) -> None:
        self.model = model
        self.calls_ = RateModel(
            "down", window=config.norm_window, persist_windows=config.norm_persist_windows,
            half_life=config.norm_half_life, z=config.norm_z, min_ratio=config.norm_min_ratio,
            min_calls=config.norm_min_calls, min_window_calls=config.norm_min_window_calls,
            max_keys=config.norm_max_stages,
        )
        self._edges: dict[tuple, dict[tuple, tuple]] = {}  # parent stage -> child stage -> rate key
        self._max_edges = config.norm_max_stages
        self._min_calls = config.norm_min_calls
        self._n_edges = 0
        self._optional: set[tuple] = set()  # call pairs too rare to be expected (bounded by norm_max_stages)
        self._pruned = -1  # the window in which optional calls were last taken out
        self._changes: list[Anomaly] = []

    def detect(self, trace: Trace) -> list[Anomaly]:
        structure, missing = self.model.missing(trace)
        if missing:
            failed = _gave_up(trace)
            if failed:
                missing = [(stage, presence) for stage, presence in missing
                           if not any(stage in self._edges.get(caller, ()) for caller in failed)]
        if not missing:
            return []
        root = trace.root
        names = ", ".join(f"{service} '{operation}'" for (service, operation, _), _ in missing[:5])
        return [finding(
            self.kind, trace.trace_id, root,
            detected_at=trace.decided_at,
            event_time=root.start,
            severity="warning",
            score=min(presence for _, presence in missing),
            summary=(
                f"{root.service} '{root.name}' ran without {names}, "
                f"which {'appears' if len(missing) == 1 else 'appear'} in nearly every normal trace of it."
            ),
            evidence={
                "missing_stages": [
                    {"service": service, "operation": operation, "kind": KIND_NAMES[kind], "presence": round(presence, 4)}
                    for (service, operation, kind), presence in missing
                ],
                "normal_traces": structure.traces,
            },
        )]

    def _observe_calls(self, trace: Trace) -> None:
        """Every call of every stage in a complete trace: which of its stage's
        usual child calls it made (counted per trace, then once per call pair).
        A call that its stage turns out to make in under half of
        ``norm_min_calls`` calls is optional: it is no longer counted."""
        edges, children, optional = self._edges, trace.children, self._optional
        counts: dict[tuple, list[int]] = {}
        for span in trace.spans:
            stage = (span.service, span.name, span.kind)
            known = edges.get(stage)
            kids = children.get(span.span_id)
            # ordered (not a set): new call pairs get their rates in the same order in every run
            present = dict.fromkeys((k.service, k.name, k.kind) for k in kids) if kids else ()
            if known is None:
                if not present or self._n_edges >= self._max_edges:
                    continue
                known = edges[stage] = {}
            for child in present:
                if child not in known and self._n_edges < self._max_edges and (*stage, *child) not in optional:
                    known[child] = (*stage, *child)
                    self._n_edges += 1
            for child, key in known.items():
                entry = counts.get(key)
                if entry is None:
                    entry = counts[key] = [0, 0, 0]
                entry[0] += 1
                if child in present:
                    entry[1] += 1
                elif not entry[2] or span.end < entry[2]:
                    entry[2] = span.end
        now, rates = trace.decided_at, self.calls_
        events: list[RateChange] = []
        rates.observe_all(counts, now, trace.trace_id.hex(), events)
        if events:
            self._changes.extend(self._findings(events, now))
        if now // rates.window != self._pruned:  # once a window: calls too rare to be expected
            self._pruned = now // rates.window
            for key, rate in list(rates.keys_.items()):
                if key in optional or rate.calls < self._min_calls or rate.change is not None:
                    continue
                if rate.hits / rate.calls < _EXPECTED_CALL_RATE and key[3:] in edges.get(key[:3], {}):
                    del edges[key[:3]][key[3:]]
                    self._n_edges -= 1
                    if len(optional) < self._max_edges:
                        optional.add(key)

    def _findings(self, events: list[RateChange], now: int) -> list[Anomaly]:
        """Only calls that were usual: an optional call made less often is not a fault."""
        return [rate_change_finding(
            self.kind, event, now, signal="calls_dropped",
            what=f"calls of {event.key[0]} '{event.key[1]}' that call {event.key[3]} '{event.key[4]}'",
            evidence={"missing_stage": {"service": event.key[3], "operation": event.key[4],
                                        "kind": KIND_NAMES[event.key[5]]}},
        ) for event in events if event.baseline_rate >= _EXPECTED_CALL_RATE]

    def learn(self, trace: Trace, flagged: frozenset[AnomalyKind]) -> None:
        """Presence and call rates learn from every trace that is rooted, has no
        orphan and lost no span (no structural kind says a span went missing or
        broke) — also from traces this detector flagged."""
        if trace.root is not None and not trace.orphans and not flagged & _LOST_SPANS:
            self.model.learn(trace)
            if trace.trace_id[-1] % _CALL_SAMPLE == 0:
                self._observe_calls(trace)

    def advance(self, now: int) -> list[Anomaly]:
        events: list[RateChange] = []
        self.calls_.advance(now, events)
        self._changes.extend(self._findings(events, now))
        changes, self._changes = self._changes, []
        return changes

    def flush(self, now: int) -> list[Anomaly]:
        events: list[RateChange] = []
        self.calls_.flush(events)
        self._changes.extend(self._findings(events, now))
        changes, self._changes = self._changes, []
        return changes

    def state(self) -> dict:
        return {"calls": self.calls_.state()}

    def restore(self, state: dict) -> None:
        self.calls_.restore(state.get("calls", []))
        for key in self.calls_.keys_:
            self._edges.setdefault(key[:3], {})[key[3:]] = key
            self._n_edges += 1
