"""Clocks that drive trace decisions: one policy, two notions of "now".

Replay and backfills use event time, so a day of traces is decided as fast as
the CPU allows and the same input always gives the same decisions; live
sources use the wall clock.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

# Traces whose spans must end far ahead of the watermark before it follows them.
CONFIRMING_TRACES = 3


class Clock(Protocol):
    #: the same input gives the same decisions at the same times (event time)
    deterministic: bool

    def observe(self, end: int, start: int, trace_id: bytes) -> int:
        """Records that a span of this trace with these times arrived (end 0:
        unfinished); returns its arrival stamp."""

    def stamping(self) -> tuple[int, int, int]:
        """How ``native.gather`` stamps a run of spans as ``observe`` would: (the
        largest event time seen, -1, the furthest ahead of it a span may end and
        still move it, or -1 for no limit) to stamp each by its end time, or (0,
        the arrival time, -1) to stamp them all with it. It leaves a span past
        that limit to ``observe``."""

    def count_with(self, counter: Callable[[int], None]) -> None:
        """Where to count the spans that ended too far ahead to move the clock alone."""

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

    One span must not move it far ahead: a span that ends more than
    ``max_ahead`` past the largest time seen (a client clock years off, or a
    forged timestamp) would otherwise make every trace in flight, and every
    later one, due at once, for good. Such a span is stamped by its own end
    (its trace waits for that time or the in-flight bounds) and counted; the
    watermark follows only when spans of ``CONFIRMING_TRACES`` traces have
    come that far ahead with no span moving it normally in between (the input
    really jumped: a gap in a replay), to the earliest of them. The first span
    of a fresh clock is believed.
    """

    deterministic = True

    def __init__(self, allowed_lateness: int, max_ahead: int = 0) -> None:
        """``max_ahead``: 0 for no limit."""
        self._lateness = allowed_lateness
        self._max_ahead = max_ahead
        self._max_seen = 0
        self._finished = False
        self._ahead: dict[bytes, int] = {}  # trace → earliest end far ahead, until believed
        self._counter: Callable[[int], None] | None = None

    def observe(self, end: int, start: int, trace_id: bytes) -> int:
        if end > self._max_seen:
            if self._max_ahead and self._max_seen and end - self._max_seen > self._max_ahead:
                self._far(end, trace_id)
            else:
                self._moved(end)
            return end
        # A span without an end time arrives "now" in event time, but not before it
        # started: a fresh clock's "now" is 0, which made such a span's trace overdue
        # at once (a consumer that took over a partition decided it without its root).
        return end or max(self._max_seen, start)

    def _far(self, end: int, trace_id: bytes) -> None:
        if self._counter is not None:
            self._counter(1)
        ahead = self._ahead
        ahead[trace_id] = min(end, ahead.get(trace_id, end))
        if len(ahead) >= CONFIRMING_TRACES:
            self._max_seen = max(self._max_seen, min(ahead.values()))
            ahead.clear()

    def _moved(self, end: int) -> None:
        """A span moved the watermark within ``max_ahead``: the input goes on where it
        was, so the spans far ahead were not a jump of it."""
        self._max_seen = end
        if self._ahead:
            self._ahead.clear()

    def count_with(self, counter: Callable[[int], None]) -> None:
        self._counter = counter

    def stamping(self) -> tuple[int, int, int]:
        return self._max_seen, -1, self._max_ahead or -1

    def seen(self, largest: int) -> None:
        if largest > self._max_seen:
            self._moved(largest)

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
        self._ahead.clear()


class WallClock:
    deterministic = False

    def observe(self, end: int, start: int, trace_id: bytes) -> int:
        return time.time_ns()

    def stamping(self) -> tuple[int, int, int]:
        return 0, time.time_ns(), -1

    def count_with(self, counter: Callable[[int], None]) -> None:
        """Wall time does not learn from spans."""

    def seen(self, largest: int) -> None:
        """Wall time does not learn from spans."""

    def now(self) -> int:
        return time.time_ns()

    def finish(self) -> None:
        """Wall time goes on; nothing to do."""


class SetClock:
    """Time moved from outside: a consumer group's judge sets it to the decision
    times of the traces the members decided, and to the watermark they have all
    passed. Its pipeline assembles nothing, so spans never reach it."""

    def __init__(self, deterministic: bool) -> None:
        """``deterministic``: the members run on event time (a live group's judge
        refits its forest in the background, as a live member would)."""
        self.deterministic = deterministic
        self._now = 0

    def set(self, now: int) -> None:
        self._now = max(self._now, now)

    def observe(self, end: int, start: int, trace_id: bytes) -> int:
        return self._now

    def stamping(self) -> tuple[int, int, int]:
        return 0, self._now, -1

    def count_with(self, counter: Callable[[int], None]) -> None:
        """Nothing is stamped here."""

    def seen(self, largest: int) -> None:
        """Nothing is stamped here."""

    def now(self) -> int:
        return self._now

    def finish(self) -> None:
        """The members have ended; the time was set by their last watermark."""
