"""``context_outlived_parent``: a synchronous child ended well after its parent.

The request context was kept past the end of the request (a leaked
goroutine/task/thread captured it). Messaging spans and spans with links are
exempt: outliving the request is what asynchronous work is for. Across
services, clocks disagree by a few ms, so the overrun must exceed the skew
tolerance; within one service, ``min_overrun``.

What a stage does routinely is its norm, not a stream of findings. Every
parent stage (the handler whose context was kept) has a learned rate: the
share of its calls that a child outlived (``models.rates``). A stage at or
above ``norm_routine_rate`` does it by design (Node.js callbacks that finish
after the response): it is reported once, as a stage-level pattern finding,
and its single occurrences are not. Any other stage is clean and each
occurrence is a finding. Either way a significant rise of the rate opens a
stage-level finding (``evidence.signal = "outlived_parent"``) that the
incident tracker turns into an incident: a leak that a deploy starts is found
on a clean stage and on a routine one. Occurrences on a stage with fewer than
``norm_min_calls`` calls are held (bounded) until its norm is known. A stage's
calls are counted exactly from its first occurrence on; the calls before, none
outlived, are taken from a count of spans per operation name.
"""

from __future__ import annotations

from collections import Counter
from operator import attrgetter

from traceguard.config import StructuralConfig
from traceguard.detect.base import finding, ms, rate_change_finding, stage_finding
from traceguard.models.rates import RateChange, RateModel, wilson_lower
from traceguard.records import KIND_CONSUMER, KIND_NAMES, KIND_PRODUCER, Anomaly, AnomalyKind, Trace

_ASYNC_KINDS = frozenset({KIND_PRODUCER, KIND_CONSUMER})
_NAME = attrgetter("name")
_MAX_HELD = 20
_EXEMPLARS = 5

Stage = tuple[str, str, int]


class ContextOutlivedParent:
    kind = AnomalyKind.CONTEXT_OUTLIVED_PARENT

    def __init__(self, config: StructuralConfig) -> None:
        self._skew = config.clock_skew_tolerance
        self._min_overrun = config.min_overrun
        self._least_tolerance = min(self._skew, self._min_overrun)
        self._min_calls = config.norm_min_calls
        self._routine_rate = config.norm_routine_rate
        self.rates_ = RateModel(
            "up", window=config.norm_window, persist_windows=config.norm_persist_windows,
            half_life=config.norm_half_life, z=config.norm_z, min_ratio=config.norm_min_ratio,
            min_calls=config.norm_min_calls, min_window_calls=config.norm_min_window_calls,
            max_keys=config.norm_max_stages,
        )
        self._max_stages = config.norm_max_stages
        self._candidates: set[Stage] = set()      # stages a child has outlived at least once
        self._candidate_names: set[str] = set()
        self._name_calls: Counter[str] = Counter()  # spans seen per operation name, all stages (bounded)
        self.routine_: dict[Stage, bool] = {}      # stages whose norm is decided
        self._held: dict[Stage, list[Anomaly]] = {}
        self.held_dropped_ = 0
        self._released: list[Anomaly] = []

    def detect(self, trace: Trace) -> list[Anomaly]:
        overruns: dict[bytes, list] | None = None
        calls: dict[Stage, list] | None = None
        by_id, least, names = trace.by_id, self._least_tolerance, self._candidate_names
        seen = self._name_calls
        if len(seen) < self._max_stages:
            seen.update(map(_NAME, trace.spans))  # counted in C
        for span in trace.spans:
            if span.name in names:  # a call of a stage a child has outlived before: counted for its rate
                key = (span.service, span.name, span.kind)
                if key in self._candidates:
                    if calls is None:
                        calls = {}
                    calls.setdefault(key, []).append(span.span_id)
            if span.parent_span_id is None or span.kind in _ASYNC_KINDS or span.has_links:
                continue
            parent = by_id.get(span.parent_span_id)
            # nearly every child ends in time: one comparison rules it out
            if parent is None or span.end - parent.end <= least or not parent.finished or not span.finished:
                continue
            overrun = span.end - parent.end
            tolerance = self._min_overrun if parent.service == span.service else self._skew
            if overrun > tolerance:
                if overruns is None:
                    overruns = {}
                overruns.setdefault(parent.span_id, []).append((span, parent, overrun, tolerance))
        if overruns is None and calls is None:
            return []
        overruns = overruns or {}
        calls = calls or {}
        for found in overruns.values():
            parent = found[0][1]
            key = (parent.service, parent.name, parent.kind)
            if key not in self._candidates and len(self._candidates) < self._max_stages:
                # First occurrence: from now on its calls are counted exactly. The calls
                # before, none of them outlived, are the spans seen under its name.
                self._candidates.add(key)
                names.add(parent.name)
                self.rates_.seed(key, seen.get(parent.name, 1) - 1)
                calls.setdefault(key, []).append(parent.span_id)
        now, trace_hex = trace.decided_at, trace.trace_id.hex()
        events: list[RateChange] = []
        for key, span_ids in calls.items():
            hit = [overruns[s] for s in span_ids if s in overruns]
            first = min(child.end for found in hit for child, *_ in found) if hit else 0
            self.rates_.observe(key, len(span_ids), len(hit), now, first, trace_hex, events)
        findings = []
        for found in overruns.values():
            parent = found[0][1]
            key = (parent.service, parent.name, parent.kind)
            anomalies = [self._anomaly(trace, *item) for item in found]
            routine = self._judge(key, now) if key in self._candidates else False
            if routine is None:
                held = self._held.setdefault(key, [])
                room = _MAX_HELD - len(held)
                held.extend(anomalies[:room])
                self.held_dropped_ += max(0, len(anomalies) - room)
            elif not routine or self.rates_.is_open(key):
                findings.extend(anomalies)  # an open rise: the incident tracker attaches them
        if events:
            self._released.extend(self._changes(events, now))
        return findings

    def _anomaly(self, trace: Trace, child, parent, overrun: int, tolerance: int) -> Anomaly:
        return finding(
            self.kind, trace.trace_id, child,
            detected_at=trace.decided_at,
            event_time=child.end,
            severity="warning",
            score=min(1.0, overrun / (tolerance * 100)),
            summary=(
                f"{child.service} '{child.name}' kept running {ms(overrun)} ms after its parent "
                f"{parent.service} '{parent.name}' ended: work held the request context after the request."
            ),
            evidence={
                "parent_span_id": parent.span_id.hex(),
                "parent_operation": parent.name,
                "parent_service": parent.service,
                "parent_kind": KIND_NAMES[parent.kind],
                "overrun_ms": ms(overrun),
                "tolerance_ms": ms(tolerance),
            },
        )

    def _judge(self, key: Stage, now: int, final: bool = False) -> bool | None:
        """Whether outliving is ``key``'s norm; None while the evidence cannot tell.

        Routine once a quarter of ``norm_min_calls`` calls show the rate surely above
        ``norm_routine_rate``; clean
        once ``norm_min_calls`` calls show it is not (or at the end of input)."""
        decided = self.routine_.get(key)
        if decided is not None:
            return decided
        calls, hits = self.rates_.evidence(key)
        if self._min_calls and calls >= self._min_calls / 4 and hits >= 3 \
                and wilson_lower(hits, calls) >= self._routine_rate:
            routine = True
        elif calls >= self._min_calls or final:
            routine = False
        else:
            return None
        self.routine_[key] = routine
        held = self._held.pop(key, [])
        if routine:
            self._released.append(self._pattern(key, calls, hits, held, now))
        else:
            self._released.extend(held)
        return routine

    def _pattern(self, key: Stage, calls: float, hits: float, held: list[Anomaly], now: int) -> Anomaly:
        service, operation, span_kind = key
        rate = hits / calls
        return stage_finding(
            self.kind, key, "norm",
            detected_at=now,
            event_time=min((a.event_time for a in held), default=now),
            severity="info",
            score=min(1.0, rate * 10),
            summary=(
                f"children of {service} '{operation}' routinely keep running after it ends "
                f"({round(hits)} of {round(calls)} calls, {rate:.2%}): learned as this stage's norm; single "
                "occurrences are not reported, a rise of the rate is."
            ),
            evidence={
                "state": "norm",
                "stage_kind": KIND_NAMES[span_kind],
                "calls": round(calls),
                "outlived": round(hits),
                "rate": round(rate, 6),
                "max_overrun_ms": max((a.evidence["overrun_ms"] for a in held), default=None),
            },
            exemplars=list(dict.fromkeys(a.trace_id for a in held))[:_EXEMPLARS],
        )

    def _changes(self, events: list[RateChange], now: int) -> list[Anomaly]:
        return [rate_change_finding(
            self.kind, event, now, signal="outlived_parent",
            what=f"calls whose children kept running after {event.key[0]} '{event.key[1]}' ended",
        ) for event in events]

    def learn(self, trace: Trace, flagged: frozenset[AnomalyKind]) -> None:
        """The norms count every trace in ``detect``, flagged or not."""

    def advance(self, now: int) -> list[Anomaly]:
        events: list[RateChange] = []
        self.rates_.advance(now, events)
        if events:
            self._released.extend(self._changes(events, now))
        for key in list(self._held) if self._held else ():
            self._judge(key, now)
        if not self._released:
            return []
        released, self._released = self._released, []
        return released

    def flush(self, now: int) -> list[Anomaly]:
        """End of input: stages still undecided are judged on what was seen."""
        events: list[RateChange] = []
        self.rates_.flush(events)
        self._released.extend(self._changes(events, now))
        for key in list(self._held):
            self._judge(key, now, final=True)
        released, self._released = self._released, []
        return released

    def state(self) -> dict:
        return {"rates": self.rates_.state(), "routine": [[*key, routine] for key, routine in self.routine_.items()]}

    def restore(self, state: dict) -> None:
        self.rates_.restore(state.get("rates", []))
        for key in self.rates_.keys_:
            self._candidates.add(key)
            self._candidate_names.add(key[1])
        for service, operation, span_kind, routine in state.get("routine", []):
            self.routine_[(str(service), str(operation), int(span_kind))] = bool(routine)
