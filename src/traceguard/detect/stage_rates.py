"""The shape every detector of a per-stage rate shares (``context_outlived_parent``,
``error_regression``): hits are observed as traces are decided, every stage's
calls are counted per window (``models.rates.WindowCalls``, shared when the
windows agree) and join the rates when the window ends, and the rate changes
(``models.rates.RateModel``) become stage-level findings that are handed over
in ``advance`` and ``flush``. A subclass says what a window's end does with
the calls and what a change's finding says.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from traceguard.models.features import stages
from traceguard.models.rates import RateChange, RateModel, WindowCalls
from traceguard.records import Anomaly, AnomalyKind, Trace

Stage = tuple[str, str, int]


class StageRateDetector(ABC):
    kind: AnomalyKind

    def __init__(self, rates: RateModel, calls: WindowCalls | None) -> None:
        """``calls`` is a stage call counter shared with other detectors whose windows agree."""
        self.rates_ = rates
        self._calls = calls if calls is not None else WindowCalls(rates.window, rates.max_keys)
        self._reader = self._calls.reader(self._keep, rates.max_keys)
        self._counting, self._next_at = self._reader == 0, 0
        self._released: list[Anomaly] = []

    def _count(self, trace: Trace) -> None:
        """Ends the window the trace's decision is past, then counts its stages' calls."""
        if trace.decided_at >= self._next_at:
            self._roll(trace.decided_at)
        if self._counting:
            self._calls.count(stages(trace))

    @abstractmethod
    def _keep(self, key: Stage) -> bool:
        """Whose calls a full window keeps."""

    def _roll(self, now: int) -> None:
        """Ends the current window once ``now`` is past it (never backwards)."""
        ended = self._calls.roll(now, self._reader)
        self._next_at = self._calls.next_at
        if ended is not None:
            self._end_window(*ended, now)

    @abstractmethod
    def _end_window(self, index: int, calls: dict[Stage, int], now: int) -> None:
        """What the end of window ``index`` does with its calls per stage."""

    @abstractmethod
    def _changes(self, events: list[RateChange], now: int) -> list[Anomaly]:
        """The stage-level findings of these rate changes."""

    def _release(self, events: list[RateChange], now: int) -> None:
        if events:
            self._released.extend(self._changes(events, now))

    def _finish(self, now: int) -> None:
        """End of input, after the last window and the rates are closed."""

    def advance(self, now: int) -> list[Anomaly]:
        """Time passes without traces too: a window that ended is handed over and closed."""
        self._roll(now)
        events: list[RateChange] = []
        self.rates_.advance(now, events)
        self._release(events, now)
        released, self._released = self._released, []
        return released

    def flush(self, now: int) -> list[Anomaly]:
        self._end_window(*self._calls.take(self._reader), now)
        events: list[RateChange] = []
        self.rates_.flush(events)
        self._release(events, now)
        self._finish(now)
        released, self._released = self._released, []
        return released

    def state(self) -> dict:
        return {"rates": self.rates_.state()}

    def restore(self, state: dict) -> None:
        self.rates_.restore(state.get("rates", []))
