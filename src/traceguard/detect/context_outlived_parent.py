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
after the response): it is reported once, as a stage-level pattern finding
(one per service: the service's stages found routine later join it), and its
single occurrences are not. Any other stage is clean and each occurrence is a
finding. Either way a significant rise of the rate opens a stage-level
finding (``evidence.signal = "outlived_parent"``) that the incident tracker
turns into an incident: a leak that a deploy starts is found on a clean stage
and on a routine one.

Occurrences on a stage whose norm is not known yet are held (bounded, and
for at most ten windows: a quiet stage is then judged on what it showed). A
stage's rate starts at its first occurrence, seeded with its calls in the
windows before (none outlived); every stage's calls are counted per window.
"""

from __future__ import annotations

from collections import Counter

from traceguard.config import StructuralConfig
from traceguard.detect.base import finding, ms, rate_change_finding, stage_finding
from traceguard.detect.stage_rates import Stage, StageRateDetector
from traceguard.models.rates import RateChange, RateModel, WindowCalls, wilson_lower
from traceguard.native import rows as native
from traceguard.records import KIND_CONSUMER, KIND_NAMES, KIND_PRODUCER, Anomaly, AnomalyKind, Span, Trace

_ASYNC_KINDS = frozenset({KIND_PRODUCER, KIND_CONSUMER})
_MAX_HELD = 20
_MAX_HOLD_WINDOWS = 10  # windows an occurrence waits for its stage's norm (5 min of 30 s windows)
_EXEMPLARS = 5



def _ended_after_parent(spans: list[Span], by_id: dict[bytes, Span], least: int) -> list[tuple[Span, Span]]:
    """(child, parent) of the synchronous children (no messaging kind, no links)
    that ended more than ``least`` after their parent, both finished: the
    reference for ``_rows.ended_after_parent``, which scans in C."""
    out = []
    for span in spans:
        if span.parent_span_id is None or span.kind in _ASYNC_KINDS or span.has_links or not span.finished:
            continue
        parent = by_id.get(span.parent_span_id)
        if parent is not None and parent.finished and span.end - parent.end > least:
            out.append((span, parent))
    return out


ended_after_parent = native.ended_after_parent if native is not None else _ended_after_parent


class ContextOutlivedParent(StageRateDetector):
    kind = AnomalyKind.CONTEXT_OUTLIVED_PARENT

    def __init__(self, config: StructuralConfig, calls: WindowCalls | None = None) -> None:
        self._skew = config.clock_skew_tolerance
        self._min_overrun = config.min_overrun
        self._least_tolerance = min(self._skew, self._min_overrun)
        self._min_calls = config.norm_min_calls
        self._routine_rate = config.norm_routine_rate
        self._max_stages = config.norm_max_stages
        self._candidates: set[Stage] = set()      # stages a child has outlived at least once: they have a rate
        self._stage_calls: Counter[Stage] = Counter()  # calls per stage in the windows before (bounded)
        super().__init__(RateModel(
            "up", window=config.norm_window, persist_windows=config.norm_persist_windows,
            half_life=config.norm_half_life, z=config.norm_z, min_ratio=config.norm_min_ratio,
            min_calls=config.norm_min_calls, min_window_calls=config.norm_min_window_calls,
            max_keys=config.norm_max_stages,
        ), calls)
        self.routine_: dict[Stage, bool] = {}      # stages whose norm is decided
        self._reported_services: set[str] = set()  # services whose routine was reported
        self._held: dict[Stage, list[Anomaly]] = {}
        self._held_since: dict[Stage, int] = {}  # window in which a stage's first occurrence was held
        self.held_dropped_ = 0

    def detect(self, trace: Trace) -> list[Anomaly]:
        overruns: dict[bytes, list] | None = None
        for span, parent in ended_after_parent(trace.spans, trace.by_id, self._least_tolerance):
            overrun = span.end - parent.end
            tolerance = self._min_overrun if parent.service == span.service else self._skew
            if overrun > tolerance:
                if overruns is None:
                    overruns = {}
                overruns.setdefault(parent.span_id, []).append((span, parent, overrun, tolerance))
        self._count(trace)
        if overruns is None:
            return []
        candidates, now, trace_hex = self._candidates, trace.decided_at, trace.trace_id.hex()
        by_stage = [((found[0][1].service, found[0][1].name, found[0][1].kind), found) for found in overruns.values()]
        for key, _ in by_stage:
            if key not in candidates and len(candidates) < self._max_stages:
                # First occurrence: from now on it has a rate, seeded with its calls in
                # the windows before (none outlived); this window's come at its end.
                candidates.add(key)
                self.rates_.seed(key, self._stage_calls.pop(key, 0))
        events: list[RateChange] = []
        findings = []
        for key, found in by_stage:
            first = min(child.end for child, *_ in found)
            self.rates_.observe(key, 0, 1, now, first, trace_hex, events)  # its calls come at the window's end
            judged = key in candidates and self._min_calls  # norms on, and this stage has a rate
            if judged and key not in self.routine_:
                routine_evidence = self._judge(key)
                if routine_evidence is not None:
                    self._report_routine([routine_evidence], now)
            routine = self.routine_.get(key)
            if judged and routine is None:
                self._held_since.setdefault(key, self._calls.index)
                held = self._held.setdefault(key, [])
                room = _MAX_HELD - len(held)
                held.extend(self._anomaly(trace, *item) for item in found[:room])
                self.held_dropped_ += max(0, len(found) - room)
            elif not routine or self.rates_.is_open(key):
                # an open rise: the incident tracker attaches them
                findings.extend(self._anomaly(trace, *item) for item in found)
        self._release(events, now)
        return findings

    def _keep(self, key: Stage) -> bool:
        """Whose calls a full window keeps: the stages with a rate or a seed."""
        return key in self._candidates or key in self._stage_calls

    def _end_window(self, index: int, calls: dict[Stage, int], now: int) -> None:
        """The window's calls go to the stages' rates (the others' become seeds),
        then every stage's norm not yet known is judged on the whole window."""
        if calls:
            at = index * self.rates_.window
            events: list[RateChange] = []
            seeds, candidates = self._stage_calls, self._candidates
            for key in sorted(candidates.intersection(calls)):  # sorted: replays agree
                self.rates_.observe(key, calls[key], 0, at, 0, "", events)
            for key, n in calls.items():
                if key not in candidates and (key in seeds or len(seeds) < self._max_stages):
                    seeds[key] += n
            self._release(events, now)
        if self._held:
            self._judge_held(now, index)

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

    def _judge_held(self, now: int, index: int, final: bool = False) -> None:
        """Judges the norms of the held stages when window ``index`` ends, and at
        the end of input."""
        found = []
        for key in list(self._held):
            # a quiet stage is not held for ever: after _MAX_HOLD_WINDOWS it is judged on what was seen
            overdue = index - self._held_since.get(key, index) >= _MAX_HOLD_WINDOWS
            routine_evidence = self._judge(key, final or overdue)
            if routine_evidence is not None:
                found.append(routine_evidence)
        self._report_routine(found, now)

    def _report_routine(self, found: list[tuple[Stage, float, float, list[Anomaly]]], now: int) -> None:
        """A service's routine is one pattern finding, of its stages found routine
        first: such a routine is usually the service's runtime (callbacks that
        finish after the response), not each handler's own, so its stages found
        routine later join that norm without a finding
        (``traceguard_context_outlived_parent_routine_stages`` counts them all)."""
        by_service: dict[str, list] = {}
        for item in found:
            by_service.setdefault(item[0][0], []).append(item)
        for service, stages_found in by_service.items():
            if service not in self._reported_services:
                self._reported_services.add(service)
                self._released.append(self._pattern(stages_found, now))

    def _judge(self, key: Stage, final: bool = False) -> tuple[Stage, float, float, list[Anomaly]] | None:
        """Decides whether outliving is ``key``'s norm, when the evidence can tell:
        routine once a quarter of ``norm_min_calls`` calls show the rate surely above
        ``norm_routine_rate``; clean once ``norm_min_calls`` calls show it is not (or
        at the end of input), and then its held occurrences are findings after all.
        The calls of the current window count (its hits already do). Returns the
        evidence of a stage found routine (calls, outlived, held occurrences)."""
        calls, hits = self.rates_.evidence(key)
        calls += self._calls.current(key)
        if self._min_calls and calls >= self._min_calls / 4 and hits >= 3 \
                and wilson_lower(hits, calls) >= self._routine_rate:
            routine = True
        elif calls >= self._min_calls or final:
            routine = False
        else:
            return None
        self.routine_[key] = routine
        held = self._held.pop(key, [])
        self._held_since.pop(key, None)
        if routine:
            return key, calls, hits, held
        self._released.extend(held)
        return None

    def _pattern(self, found: list[tuple[Stage, float, float, list[Anomaly]]], now: int) -> Anomaly:
        """One service's stages found routine at once; led by the one with most calls."""
        found = sorted(found, key=lambda f: (-f[1], f[0]))
        (service, operation, span_kind), calls, hits, _ = found[0]
        held = [a for *_, occurrences in found for a in occurrences]
        rate = hits / calls
        described = ", ".join(f"'{key[1]}' ({round(h)} of {round(c)} calls, {h / c:.2%})" for key, c, h, _ in found)
        return stage_finding(
            self.kind, (service, operation, span_kind), "norm",
            detected_at=now,
            event_time=min((a.event_time for a in held), default=now),
            severity="info",
            score=min(1.0, rate * 10),
            summary=(
                f"children of {service} {described} routinely keep running after "
                f"{'it ends' if len(found) == 1 else 'they end'}: learned as the norm of "
                f"{'this stage' if len(found) == 1 else 'these stages'}; single occurrences are not reported, "
                "a rise of the rate is."
            ),
            evidence={
                "state": "norm",
                "stage_kind": KIND_NAMES[span_kind],
                "calls": round(calls),
                "outlived": round(hits),
                "rate": round(rate, 6),
                "stages": [{"operation": key[1], "kind": KIND_NAMES[key[2]], "calls": round(c), "outlived": round(h),
                            "rate": round(h / c, 6)} for key, c, h, _ in found],
                "max_overrun_ms": max((a.evidence["overrun_ms"] for a in held), default=None),
            },
            exemplars=list(dict.fromkeys(a.trace_id for a in held))[:_EXEMPLARS],
        )

    def _changes(self, events: list[RateChange], now: int) -> list[Anomaly]:
        return [rate_change_finding(
            self.kind, event, now, signal="outlived_parent",
            what=f"calls whose children kept running after {event.key[0]} '{event.key[1]}' ended",
        ) for event in events]

    def _finish(self, now: int) -> None:
        """End of input: stages still undecided are judged on what was seen."""
        self._judge_held(now, self._calls.index, final=True)

    def state(self) -> dict:
        return {**super().state(), "routine": [[*key, routine] for key, routine in self.routine_.items()]}

    def restore(self, state: dict) -> None:
        super().restore(state)
        self._candidates.update(self.rates_.keys_)
        for service, operation, span_kind, routine in state.get("routine", []):
            self.routine_[(str(service), str(operation), int(span_kind))] = bool(routine)
        self._reported_services.update(key[0] for key, routine in self.routine_.items() if routine)
