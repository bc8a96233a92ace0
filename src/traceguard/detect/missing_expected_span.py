"""``missing_expected_span``: a stage (almost) every normal trace of this root operation has is absent.

One finding per trace, on its root span, listing every absent stage. Every
complete trace (rooted, no orphan) teaches the model, flagged or not: a model
that learned only from unflagged traces could never learn that a stage is
legitimately absent in 5 % of requests, and would flag every one of them
forever. Incomplete traces stay out: their absences are lost spans.

Stage-level: each parent stage learns the share of its calls that make each
child call it normally makes (``models.rates``, direction down). When a stage
stops making a call it made in most of its calls (a handler that returns
early, a cache that stopped missing), a stage-level finding opens with
``evidence.signal = "calls_dropped"`` and the parent stage as the culprit:
its own code changed what it does. Optional calls have their own rates and
are judged against them.
"""

from __future__ import annotations

from traceguard.config import StructuralConfig
from traceguard.detect.base import finding, rate_change_finding
from traceguard.models.rates import RateChange, RateModel
from traceguard.models.structure import StructureModel
from traceguard.records import KIND_NAMES, Anomaly, AnomalyKind, Trace

# A call is expected of a parent stage, and its absence judged, once it is made
# in at least this share of the stage's calls.
_EXPECTED_CALL_RATE = 0.5


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
        self._edges: dict[tuple, list[tuple]] = {}  # parent stage -> child stages it has called
        self._max_edges = config.norm_max_stages
        self._n_edges = 0
        self._changes: list[Anomaly] = []

    def detect(self, trace: Trace) -> list[Anomaly]:
        structure, missing = self.model.missing(trace)
        if trace.root is not None and not trace.orphans:
            self.model.learn(trace)
            self._observe_calls(trace)
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
        usual child calls it made."""
        by_id = trace.by_id
        made: dict[bytes, set] = {}
        edges = self._edges
        for span in trace.spans:
            parent = by_id.get(span.parent_span_id) if span.parent_span_id is not None else None
            if parent is None:
                continue
            child = (span.service, span.name, span.kind)
            made.setdefault(parent.span_id, set()).add(child)
            known = edges.get((parent.service, parent.name, parent.kind))
            if known is None:
                if self._n_edges >= self._max_edges:
                    continue
                known = edges[(parent.service, parent.name, parent.kind)] = []
            if child not in known and self._n_edges < self._max_edges:
                known.append(child)
                self._n_edges += 1
        now, trace_hex, rates = trace.decided_at, trace.trace_id.hex(), self.calls_
        events: list[RateChange] = []
        for span in trace.spans:
            key = (span.service, span.name, span.kind)
            known = edges.get(key)
            if not known:
                continue
            children = made.get(span.span_id, ())
            for child in known:
                rates.observe((*key, *child), child in children, now, span.end, trace_hex, events)
        self._changes.extend(self._findings(events, now))

    def _findings(self, events: list[RateChange], now: int) -> list[Anomaly]:
        """Only calls that were usual: an optional call made less often is not a fault."""
        return [rate_change_finding(
            self.kind, event, now, signal="calls_dropped",
            what=f"calls of {event.key[0]} '{event.key[1]}' that call {event.key[3]} '{event.key[4]}'",
            evidence={"missing_stage": {"service": event.key[3], "operation": event.key[4],
                                        "kind": KIND_NAMES[event.key[5]]}},
        ) for event in events if event.baseline_rate >= _EXPECTED_CALL_RATE]

    def learn(self, trace: Trace) -> None:
        """The structure learns from every complete trace in ``detect``."""

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
            self._edges.setdefault(key[:3], []).append(key[3:])
            self._n_edges += 1
