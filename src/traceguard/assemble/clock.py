"""Clocks that drive trace decisions: one policy, two notions of "now".

Replay and backfills use event time, so a day of traces is decided as fast as
the CPU allows and the same input always gives the same decisions; live
sources use the wall clock.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def observe(self, event_time: int) -> int:
        """Records that a span with this event time arrived; returns its arrival stamp."""

    def now(self) -> int:
        """The time up to which decisions may be taken (unix ns)."""

    def finish(self) -> None:
        """No more input will come (end of a replay, shutdown)."""


class EventTimeClock:
    """A watermark over span timestamps with bounded out-of-orderness.

    ``now()`` trails the largest event time seen by ``allowed_lateness``, so a
    span up to that much older than the newest still counts as on time.
    """

    def __init__(self, allowed_lateness: int) -> None:
        self._lateness = allowed_lateness
        self._max_seen = 0
        self._finished = False

    def observe(self, event_time: int) -> int:
        if event_time > self._max_seen:
            self._max_seen = event_time
            return event_time
        # A span without a usable end time arrives "now" in event time.
        return event_time or self._max_seen

    def now(self) -> int:
        if self._finished:
            return self._max_seen
        return self._max_seen - self._lateness

    def finish(self) -> None:
        """The input has ended: nothing older than the newest event can come."""
        self._finished = True

    def reset(self) -> None:
        """The input starts over from an earlier point (a Kafka rebalance): forget the watermark."""
        self._max_seen = 0
        self._finished = False


class WallClock:
    def observe(self, event_time: int) -> int:
        return time.time_ns()

    def now(self) -> int:
        return time.time_ns()

    def finish(self) -> None:
        """Wall time goes on; nothing to do."""
