"""Clocks that drive trace decisions: one policy, two notions of "now".

Replay and backfills use event time, so a day of traces is decided as fast as
the CPU allows and the same input always gives the same decisions; live
sources use the wall clock.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def observe(self, end: int, start: int) -> int:
        """Records that a span with these times arrived (end 0: unfinished); returns its arrival stamp."""

    def stamping(self) -> tuple[int, int]:
        """How ``native.gather`` stamps a run of spans as ``observe`` would: (the
        largest event time seen, -1) to stamp each by its end time, or (0, the
        arrival time) to stamp them all with it."""

    def seen(self, largest: int) -> None:
        """``native.gather`` stamped spans by event time up to ``largest``."""

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

    def observe(self, end: int, start: int) -> int:
        if end > self._max_seen:
            self._max_seen = end
            return end
        # A span without an end time arrives "now" in event time, but not before it
        # started: a fresh clock's "now" is 0, which made such a span's trace overdue
        # at once (a consumer that took over a partition decided it without its root).
        return end or max(self._max_seen, start)

    def stamping(self) -> tuple[int, int]:
        return self._max_seen, -1

    def seen(self, largest: int) -> None:
        self._max_seen = max(self._max_seen, largest)

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
    def observe(self, end: int, start: int) -> int:
        return time.time_ns()

    def stamping(self) -> tuple[int, int]:
        return 0, time.time_ns()

    def seen(self, largest: int) -> None:
        """Wall time does not learn from spans."""

    def now(self) -> int:
        return time.time_ns()

    def finish(self) -> None:
        """Wall time goes on; nothing to do."""
