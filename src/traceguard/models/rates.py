"""Per-stage event rates: what share of a stage's calls show a behaviour, and when that share changes.

A rate is (calls, hits) of one key: a parent stage and the calls a child
outlived, or a parent stage and the calls that made an expected child call.
Each key keeps a baseline (counts that decay with ``half_life`` of event time)
and the counts of the current window. When a window closes its rate is tested
against the baseline with a binomial z score; a change in the watched direction
(``up`` for a behaviour that is bad, ``down`` for one that should be there) opens
after ``persist_windows`` changed windows in a row and resolves after as many
calm ones. Only calm windows of a key with no open change join the baseline,
so a routine behaviour (a Node.js callback that finishes after the response in
5 % of calls) is learned as the norm while a change is never absorbed.

Windows are keyed by decision time (the pipeline clock), as in ``latency``.
"""

from __future__ import annotations

import math
from collections import _count_elements  # type: ignore[attr-defined]
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Hashable, Literal

Direction = Literal["up", "down"]
_EXEMPLARS = 5


@dataclass
class RateChange:
    """An open (or just resolved) change of one key's rate."""

    key: Hashable
    onset: int
    opened_at: int
    baseline_rate: float
    baseline_calls: int
    current_rate: float = 0.0
    current_calls: int = 0
    current_hits: int = 0
    exemplars: list[str] = field(default_factory=list)
    resolved_at: int | None = None

    @property
    def magnitude(self) -> float:
        """How many times the baseline rate (up) or how many times fewer (down)."""
        current = (self.current_hits + 0.5) / (self.current_calls + 1)  # a rate of 0 is "under one in N"
        low, high = sorted((self.baseline_rate, current))
        return round(high / max(low, 1e-6), 3)


class _Rate:
    __slots__ = ("calls", "hits", "w_index", "w_calls", "w_hits", "w_first", "w_exemplars", "run", "run_first",
                 "run_exemplars", "calm", "change", "last_index")

    def __init__(self) -> None:
        self.calls = 0.0          # baseline, decayed
        self.hits = 0.0
        self.w_index = -1
        self.w_calls = 0
        self.w_hits = 0
        self.w_first = 0          # earliest event time of an affected call in the window
        self.w_exemplars: list[str] = []
        self.run = 0              # changed windows in a row
        self.run_first = 0
        self.run_exemplars: list[str] = []
        self.calm = 0
        self.change: RateChange | None = None
        self.last_index = -1


class RateModel:
    """Rates of many keys in one direction; ``observe`` counts, closing windows yields changes."""

    def __init__(self, direction: Direction, *, window: int, persist_windows: int, half_life: int, z: float,
                 min_ratio: float, min_calls: int, min_window_calls: int, max_keys: int) -> None:
        self.direction = direction
        self.window = window
        self.persist = persist_windows
        self.z = z
        self.min_ratio = min_ratio
        self.min_calls = min_calls
        self.min_window_calls = min_window_calls
        self.max_keys = max_keys
        self._decay = 0.5 ** (window / half_life) if half_life else 1.0
        self.keys_: dict[Hashable, _Rate] = {}
        self.untracked_ = 0
        self._swept = 0

    def rate(self, key: Hashable) -> tuple[float, float] | None:
        """(baseline calls, baseline rate) of ``key``, None if never seen."""
        rate = self.keys_.get(key)
        if rate is None or not rate.calls:
            return None
        return rate.calls, rate.hits / rate.calls

    def evidence(self, key: Hashable) -> tuple[float, float]:
        """(calls, hits) seen so far, baseline and current window together."""
        rate = self.keys_.get(key)
        if rate is None:
            return 0.0, 0.0
        return rate.calls + rate.w_calls, rate.hits + rate.w_hits

    def seed(self, key: Hashable, calls: float) -> None:
        """Starts ``key``'s baseline with ``calls`` calls that showed nothing (counted
        elsewhere before the key was worth a rate of its own)."""
        if key not in self.keys_ and len(self.keys_) < self.max_keys:
            self.keys_[key] = rate = _Rate()
            rate.calls = float(max(calls, 0))

    def is_open(self, key: Hashable) -> bool:
        rate = self.keys_.get(key)
        return rate is not None and rate.change is not None

    def observe(self, key: Hashable, calls: int, hits: int, now: int, first_affected: int, trace_id: str,
                events: list[RateChange]) -> None:
        """``calls`` of ``key`` in one trace, ``hits`` of them showing the behaviour;
        ``first_affected``: event time of the first affected call (0 if none: no hit
        when watching up, every call made when watching down)."""
        rate = self.keys_.get(key)
        if rate is None:
            if len(self.keys_) >= self.max_keys:
                self.untracked_ += calls
                return
            rate = self.keys_[key] = _Rate()
        index = now // self.window
        if rate.w_index != index:
            if rate.w_index >= 0:
                self._close(key, rate, events)
            rate.w_index = index
        _add(rate, calls, hits, first_affected, trace_id)

    def observe_all(self, counts: dict, now: int, trace_id: str, events: list[RateChange]) -> None:
        """``observe`` for each ``key: [calls, hits, first_affected]`` of one trace
        (keys whose window is current skip the call)."""
        keys, index = self.keys_, now // self.window
        for key, (calls, hits, first) in counts.items():
            rate = keys.get(key)
            if rate is None or rate.w_index != index:
                self.observe(key, calls, hits, now, first, trace_id, events)
            else:
                _add(rate, calls, hits, first, trace_id)

    def advance(self, now: int, events: list[RateChange]) -> None:
        """Closes every window that ended before ``now``'s window (once per window period)."""
        index = now // self.window
        if index <= self._swept:
            return
        self._swept = index
        for key, rate in self.keys_.items():
            if 0 <= rate.w_index < index:
                self._close(key, rate, events)

    def flush(self, events: list[RateChange]) -> None:
        for key, rate in self.keys_.items():
            if rate.w_index >= 0:
                self._close(key, rate, events)

    def _changed(self, rate: _Rate) -> bool:
        """The window's rate moved the watched way: by ``min_ratio`` and ``z`` binomial standard errors."""
        calls, hits = rate.w_calls, rate.w_hits
        if rate.calls < self.min_calls or calls < self.min_window_calls:
            return False
        # A baseline that never saw the behaviour still allows half a hit.
        base = min(max(rate.hits, 0.5) / rate.calls, 1.0 - 0.5 / rate.calls)
        current = hits / calls
        z = (current - base) / math.sqrt(base * (1.0 - base) / calls)
        if self.direction == "up":
            return current >= base * self.min_ratio and z >= self.z and hits >= 3
        return current * self.min_ratio <= base and -z >= self.z

    def _close(self, key: Hashable, rate: _Rate, events: list[RateChange]) -> None:
        index = rate.w_index
        if index - rate.last_index > self.persist and (rate.run or rate.change is not None):
            self._end(rate, (rate.last_index + 1) * self.window, events)  # the evidence stopped coming
        rate.last_index = index
        changed = self._changed(rate)
        if rate.change is not None:
            if changed:
                rate.calm = 0
                self._describe(rate.change, rate)
            else:
                rate.calm += 1
                if rate.calm >= self.persist:
                    self._end(rate, (index + 1) * self.window, events)
        elif changed:
            if not rate.run:
                rate.run_first, rate.run_exemplars = rate.w_first, []
            rate.run += 1
            rate.run_exemplars = (rate.run_exemplars + rate.w_exemplars)[:_EXEMPLARS]
            if rate.run >= self.persist:
                base = min(max(rate.hits, 0.5) / rate.calls, 1.0)
                rate.change = RateChange(key, rate.run_first or (index * self.window), (index + 1) * self.window,
                                         round(base, 6), round(rate.calls))
                self._describe(rate.change, rate)
                rate.change.exemplars = list(dict.fromkeys(rate.run_exemplars + rate.change.exemplars))[:_EXEMPLARS]
                rate.run = 0
                events.append(rate.change)
        else:
            rate.run = 0
            rate.calls = rate.calls * self._decay + rate.w_calls
            rate.hits = rate.hits * self._decay + rate.w_hits
        rate.w_index, rate.w_calls, rate.w_hits, rate.w_first, rate.w_exemplars = -1, 0, 0, 0, []

    @staticmethod
    def _describe(change: RateChange, rate: _Rate) -> None:
        change.current_calls, change.current_hits = rate.w_calls, rate.w_hits
        change.current_rate = round(rate.w_hits / rate.w_calls, 6) if rate.w_calls else 0.0
        if not change.exemplars:
            change.exemplars = rate.w_exemplars[:_EXEMPLARS]

    @staticmethod
    def _end(rate: _Rate, at: int, events: list[RateChange]) -> None:
        rate.run, rate.calm = 0, 0
        change, rate.change = rate.change, None
        if change is not None:
            change.resolved_at = at
            events.append(change)

    def state(self) -> list:
        """Baselines as JSON-ready rows (windows in progress are not kept)."""
        return [[list(key) if isinstance(key, tuple) else key, round(r.calls, 3), round(r.hits, 3)]
                for key, r in self.keys_.items()]

    def restore(self, rows: list) -> None:
        for key, calls, hits in rows:
            rate = self.keys_[_tuple(key)] = _Rate()
            rate.calls, rate.hits = float(calls), float(hits)


class WindowCalls:
    """Calls of every stage in the current window, for rates whose hits are
    observed as they happen and whose calls join when the window ends.

    Counting every stage of every trace was the cost of the detectors that keep
    such rates, so it is done once for all of them: detectors whose windows
    agree share one counter, each as a ``reader`` that is handed every window
    that ends; the first reader's traces are the ones counted (every reader sees
    every trace). Traces are counted in C, a batch at a time. Bounded: past
    ``4 * max_keys`` keys in a window, the keys no reader keeps go."""

    _BATCH = 256

    __slots__ = ("window", "index", "next_at", "_calls", "_pending", "_max_keys", "_keeps", "_handed", "_ended")

    def __init__(self, window: int, max_keys: int) -> None:
        self.window = window
        self.index = -1
        self.next_at = 0
        self._calls: dict[Hashable, int] = {}
        self._pending: list[list] = []
        self._max_keys = max_keys
        self._keeps: list[Callable[[Hashable], bool]] = []
        self._handed: list[int] = []  # per reader: the index of the last window handed to it
        self._ended: tuple[int, dict[Hashable, int]] = (-1, {})

    def reader(self, keep: Callable[[Hashable], bool], max_keys: int) -> int:
        """A new reader, which keeps the keys ``keep`` accepts (bounded by its ``max_keys``)."""
        self._keeps.append(keep)
        self._handed.append(-2)
        self._max_keys = max(self._max_keys, max_keys)
        return len(self._keeps) - 1

    def count(self, keys: list) -> None:
        """One trace's stages (``models.features.stages``), told by the first reader."""
        self._pending.append(keys)
        if len(self._pending) >= self._BATCH:
            self._settle()

    def current(self, key: Hashable) -> int:
        """The key's calls so far in the current window."""
        self._settle()
        return self._calls.get(key, 0)

    def roll(self, now: int, reader: int) -> tuple[int, dict[Hashable, int]] | None:
        """(index, calls) of the window that ``now`` ended, once to each reader;
        None while it has not (index -1 before the first window): windows only
        move forward."""
        index = now // self.window
        if index > self.index:
            self._settle()
            self._ended = self.index, self._calls
            self.index, self._calls, self.next_at = index, {}, (index + 1) * self.window
        if self._handed[reader] < self._ended[0]:
            self._handed[reader] = self._ended[0]
            return self._ended
        return None

    def take(self, reader: int) -> tuple[int, dict[Hashable, int]]:
        """(index, calls) of the current window (end of input): what each reader
        is handed last."""
        self._settle()
        self._handed[reader] = self.index
        return self.index, self._calls

    def _settle(self) -> None:
        if self._pending:
            _count_elements(self._calls, chain.from_iterable(self._pending))
            self._pending.clear()
            if len(self._calls) > 4 * self._max_keys:
                keeps = self._keeps
                self._calls = {key: n for key, n in self._calls.items() if any(keep(key) for keep in keeps)}


def _add(rate: _Rate, calls: int, hits: int, first_affected: int, trace_id: str) -> None:
    rate.w_calls += calls
    rate.w_hits += hits
    if first_affected:
        if not rate.w_first or first_affected < rate.w_first:
            rate.w_first = first_affected
        if len(rate.w_exemplars) < _EXEMPLARS:
            rate.w_exemplars.append(trace_id)


def wilson_lower(hits: float, calls: float, z: float = 3.0) -> float:
    """Lower confidence bound of a binomial rate: how low it can be, given what was seen."""
    if calls <= 0:
        return 0.0
    p = hits / calls
    centre = p + z * z / (2 * calls)
    spread = z * math.sqrt(p * (1 - p) / calls + z * z / (4 * calls * calls))
    return max(0.0, (centre - spread) / (1 + z * z / calls))


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value
