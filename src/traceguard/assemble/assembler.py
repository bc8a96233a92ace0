"""TraceAssembler: groups span rows by trace id and decides each trace once.

Policy (DESIGN.md, "Time"): a trace is decided when its root has arrived and
no span has come for ``decision_wait``, or when it is older than
``max_trace_age``. In fragment mode (``local``: a sidecar that sees only its
pod's spans) an entry span (SERVER or CONSUMER) counts as a root: its parent
is in another pod, and the fragment's spans hang off it. Decided ids are remembered (bounded, with TTL) so a span
that comes afterwards is reported as late instead of starting a new trace.
At the in-flight bounds the oldest traces are decided early ("evicted").

On event time a trace is stamped as decided when it became due (at the latest
of its stamps so far), not at the watermark that passed that: the watermark
moves in steps of what this process reads, so a consumer group member, which
reads some partitions, would stamp a trace otherwise than one consumer of all
of them, and the windows the stamp puts its samples in would differ.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from typing import Callable, Iterable, get_args

from traceguard.assemble.clock import Clock
from traceguard.config import AssemblerConfig
from traceguard.metrics import Metrics
from traceguard.native import rows as native
from traceguard.records import (
    FLAG_HAS_LINKS, KIND_CONSUMER, KIND_SERVER, NO_PARENT, SPAN_CORE, STATUS_ERROR, DecisionReason, Span, SpanRow, Trace,
)


_INT64_MAX = (1 << 63) - 1
# Spans that start a process's part of a request: their parent is in the caller's process.
ENTRY_KINDS = frozenset({KIND_SERVER, KIND_CONSUMER})


class _Pending:
    __slots__ = ("rows", "first_seen", "last_seen", "has_root")

    def __init__(self, stamp: int) -> None:
        self.rows: list[SpanRow] = []
        self.first_seen = stamp
        self.last_seen = stamp
        self.has_root = False


class TraceAssembler:
    """Buffers spans of in-flight traces and hands each decided ``Trace`` on.

    Args:
        config: bounds and the decision policy.
        clock: event-time watermark (replay) or wall clock (live).
        on_trace: receives every decided trace, exactly once.
        on_late: receives (trace id, span, decided at) for a span of an already decided trace.
    """

    def __init__(
        self,
        config: AssemblerConfig,
        clock: Clock,
        on_trace: Callable[[Trace], None],
        on_late: Callable[[bytes, Span, int], None],
        metrics: Metrics,
        local: bool = False,
    ) -> None:
        self._config = config
        self._local = local
        self._clock = clock
        self._on_trace = on_trace
        self._on_late = on_late
        self._metrics = metrics
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        # (due, seq, trace_id); stale entries are skipped or re-pushed on pop.
        self._due: list[tuple[int, int, bytes]] = []
        self._seq = 0
        self._stamp_due = clock.deterministic
        self._last_stamp = 0  # stamps never go back: a stage's windows only move forward
        self._decided: OrderedDict[bytes, int] = OrderedDict()
        self._count_decided = {reason: metrics.counter("traceguard_traces_decided_total", reason=reason)
                               for reason in get_args(DecisionReason)}
        self.spans_in_flight = 0
        metrics.gauge("traceguard_spans_in_flight", lambda: self.spans_in_flight)
        clock.count_with(metrics.counter("traceguard_spans_far_ahead_total"))
        metrics.gauge("traceguard_traces_in_flight", lambda: len(self._pending))

    @property
    def traces_in_flight(self) -> int:
        return len(self._pending)

    def is_decided(self, trace_id: bytes) -> bool:
        """Whether the trace was decided (and is still remembered)."""
        return trace_id in self._decided

    def undecided(self, trace_ids: set[bytes]) -> set[bytes]:
        """Those of ``trace_ids`` not decided (or no longer remembered as decided).

        Looks each id up: a set operation with the decided keys would walk all of
        them (up to ``decided_memory``) for every record."""
        decided = self._decided
        return {trace_id for trace_id in trace_ids if trace_id not in decided}

    def decided_at(self, trace_id: bytes) -> int | None:
        return self._decided.get(trace_id)

    def remember_decided(self, trace_id: bytes, decided_at: int) -> None:
        """Another process decided this trace (a Kafka partition's previous owner):
        its further spans are late."""
        if self._config.decided_memory and trace_id not in self._pending:
            self._decided[trace_id] = decided_at
            if len(self._decided) > self._config.decided_memory:
                self._decided.popitem(last=False)

    def room(self) -> int:
        """Spans that can still be taken before the bound; live sources push back at 0."""
        return self._config.max_spans_in_flight - self.spans_in_flight

    def add(self, rows: Iterable[SpanRow]) -> None:
        rows = rows if isinstance(rows, list) else list(rows)  # native.gather walks a list
        # traces new in this batch or whose root came in it: scheduled once the batch is in
        schedule: dict[bytes, _Pending] = {}
        added = at = 0
        while at < len(rows):
            if native is not None:
                max_seen, arrival, max_ahead = self._clock.stamping()
                if max(max_seen, arrival, max_ahead) <= _INT64_MAX:
                    at, taken, max_seen = native.gather(rows, at, self._pending, self._decided, _Pending, schedule,
                                                        max_seen, arrival, max_ahead, self._local)
                    self._clock.seen(max_seen)
                    added += taken
                    if at == len(rows):
                        break
            added += self._take(rows[at], schedule)
            at += 1
        for trace_id, trace in schedule.items():
            self._push(self._due_time(trace), trace_id)
        self.spans_in_flight += added
        self._metrics.inc("traceguard_spans_accepted_total", added)
        self._enforce_bounds()

    def _take(self, row: SpanRow, schedule: dict[bytes, _Pending]) -> int:
        """One span in: 1 if it joined a pending trace, 0 if it came late. ``native.gather``
        does this for runs of spans and leaves to it the ones it does not handle."""
        trace_id = row.trace_id
        trace = self._pending.get(trace_id)
        stamp = self._clock.observe(row.end, row.start, trace_id)
        if trace is None:
            decided_at = self._decided.get(trace_id)
            if decided_at is not None:
                self._metrics.inc("traceguard_late_spans_total")
                self._on_late(trace_id, to_span(row), decided_at)
                return 0
            trace = self._pending[trace_id] = schedule[trace_id] = _Pending(stamp)
        else:
            row.trace_id = trace.rows[0].trace_id  # share one id object per trace
            if stamp > trace.last_seen:
                trace.last_seen = stamp
        trace.rows.append(row)
        if not trace.has_root and (row.core.startswith(NO_PARENT, 8) or (self._local and row.core[24] in ENTRY_KINDS)):
            trace.has_root = True
            schedule[trace_id] = trace
        return 1

    def advance(self, limit: int | None = None) -> bool:
        """Decides the traces due at the clock's ``now()``, at most ``limit`` of them.

        Returns:
            whether due traces are left (only when ``limit`` stopped it).
        """
        clock_now = self._clock.now
        now = clock_now()
        heap = self._due
        pending = self._pending
        due_time = self._due_time
        wait = self._config.decision_wait
        lags: list[float] = []
        more = False
        while heap and heap[0][0] <= now:
            if limit is not None and len(lags) >= limit:
                more = True
                break
            trace_id = heapq.heappop(heap)[2]
            trace = pending.get(trace_id)
            if trace is None:
                continue
            due = due_time(trace)
            if due > now:
                self._push(due, trace_id)
                continue
            # The clock is read again per trace: on the wall clock a burst of due
            # traces takes a while to get through, and that wait is reported as
            # decision lag, not hidden in the time from decision to finding.
            decided_at = clock_now()
            lags.append(max(0, decided_at - due) / 1e9)
            if self._stamp_due:
                decided_at = max(due, self._last_stamp)
            quiet = trace.has_root and trace.last_seen + wait <= now
            self._decide(trace_id, "quiet" if quiet else "max_age", decided_at)
        if lags:
            self._metrics.observe_many("traceguard_decision_lag_seconds", lags)
        if not more:
            self._expire_decided(now)
        return more

    def discard(self, trace_ids) -> int:
        """Forgets these traces, in flight or decided, without deciding them: their
        spans will be read again from the source (a Kafka partition that moved to
        another consumer, or back to this one). Returns how many were in flight."""
        dropped = 0
        for trace_id in trace_ids:
            pending = self._pending.pop(trace_id, None)
            if pending is not None:
                self.spans_in_flight -= len(pending.rows)
                dropped += 1
            self._decided.pop(trace_id, None)
        return dropped

    def flush(self, deadline: float | None = None, limit: int | None = None) -> int:
        """Decides what is in flight (end of input, shutdown), oldest first, at most
        ``limit`` traces; with a ``deadline`` (``time.monotonic()``) it stops there,
        and the traces left are dropped and counted. Returns how many were left."""
        now = self._clock.now()
        decided = 0
        while self._pending and (limit is None or decided < limit):
            if deadline is not None and decided % 64 == 0 and time.monotonic() >= deadline:
                return self._abandon()
            self._decide(next(iter(self._pending)), "flush", now)
            decided += 1
        if not self._pending:
            self._due.clear()
        return 0

    def _abandon(self) -> int:
        left, spans = len(self._pending), self.spans_in_flight
        self._metrics.inc("traceguard_traces_abandoned_total", left, reason="shutdown_timeout")
        self._metrics.inc("traceguard_spans_abandoned_total", spans, reason="shutdown_timeout")
        self._pending.clear()
        self._due.clear()
        self.spans_in_flight = 0
        return left

    def _due_time(self, trace: _Pending) -> int:
        by_age = trace.first_seen + self._config.max_trace_age
        if trace.has_root:
            return min(trace.last_seen + self._config.decision_wait, by_age)
        return by_age

    def _push(self, due: int, trace_id: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._due, (due, self._seq, trace_id))

    def _enforce_bounds(self) -> None:
        config = self._config
        if self.spans_in_flight <= config.max_spans_in_flight and len(self._pending) <= config.max_traces_in_flight:
            return
        now = self._clock.now()
        while self._pending and (
            self.spans_in_flight > config.max_spans_in_flight or len(self._pending) > config.max_traces_in_flight
        ):
            self._metrics.inc("traceguard_traces_evicted_total")
            self._decide(next(iter(self._pending)), "evicted", now)

    def restart(self) -> None:
        """The input starts over from an earlier point (the clock was reset: a Kafka
        rebalance): decision stamps may go back with it."""
        self._last_stamp = 0

    def _decide(self, trace_id: bytes, reason: DecisionReason, now: int) -> None:
        if now > self._last_stamp:
            self._last_stamp = now
        pending = self._pending.pop(trace_id)
        self.spans_in_flight -= len(pending.rows)
        if self._config.decided_memory:
            self._decided[trace_id] = now
            if len(self._decided) > self._config.decided_memory:
                self._decided.popitem(last=False)
        self._count_decided[reason]()
        self._on_trace(_expand(trace_id, pending, reason, now, self._metrics, self._local))

    def _expire_decided(self, now: int) -> None:
        horizon = now - self._config.decided_ttl
        decided = self._decided
        while decided:
            trace_id, decided_at = next(iter(decided.items()))
            if decided_at >= horizon:
                break
            decided.popitem(last=False)


def to_span(row: SpanRow, unpack=SPAN_CORE.unpack) -> Span:
    """The expanded view of a buffered row."""
    span_id, parent, start, kind, status, flags = unpack(row.core)
    return Span(span_id, None if parent == NO_PARENT else parent, start, row.end, kind, status,
                bool(flags & FLAG_HAS_LINKS), row.service, row.name, row.attrs, row.instance)


_STAGE_CACHE = 65536
_stages: dict[tuple[str, str, int], tuple[str, str, int]] = {}


def _interned(stage: tuple[str, str, int]) -> tuple[str, str, int]:
    """The one tuple of a stage, so that stage-keyed dicts find it by identity."""
    if len(_stages) >= _STAGE_CACHE:
        _stages.clear()
    return _stages.setdefault(stage, stage)


def _expand_rows(rows: list[SpanRow]) -> tuple[list[Span], dict[bytes, Span], dict[bytes, list[Span]], list[Span],
                                               int, Span | None, list[tuple[str, str, int]], list[Span]]:
    """(spans, by id, children by parent id, orphans, duplicates skipped, root, each
    span's stage, the failed spans): the reference for ``_rows.expand``, which does
    the same in C. The stages are made here because nearly every detector keys its
    state by them, the failed spans because nearly every trace has none."""
    spans: list[Span] = []
    by_id: dict[bytes, Span] = {}
    children: dict[bytes, list[Span]] = {}
    duplicates = 0
    root = None
    for row in rows:
        span = to_span(row)
        span_id = span.span_id
        if span_id in by_id:
            duplicates += 1
            continue
        spans.append(span)
        by_id[span_id] = span
        parent = span.parent_span_id
        if parent is None:
            if root is None or span.start < root.start:
                root = span
        else:
            children.setdefault(parent, []).append(span)
    orphans = [span for parent, group in children.items() if parent not in by_id for span in group]
    stages = [_interned((s.service, s.name, s.kind)) for s in spans]
    return spans, by_id, children, orphans, duplicates, root, stages, [s for s in spans if s.status == STATUS_ERROR]


expand_rows = native.expand if native is not None else _expand_rows


def _expand(trace_id: bytes, pending: _Pending, reason: DecisionReason, now: int, metrics: Metrics,
            local: bool = False) -> Trace:
    spans, by_id, children, orphans, duplicates, root, stages, failed = expand_rows(pending.rows)
    if duplicates:
        metrics.inc("traceguard_duplicate_spans_total", duplicates)
    if local and orphans:
        # A fragment: an entry span's parent is in another pod, so it is a root
        # here and not an orphan; the earliest is the fragment's root.
        entries = [span for span in orphans if span.kind in ENTRY_KINDS]
        if entries:
            orphans = [span for span in orphans if span.kind not in ENTRY_KINDS]
            if root is None:
                root = min(entries, key=lambda span: (span.start, span.span_id))
    trace = Trace(trace_id, spans, by_id, children, orphans, root, reason, now, pending.first_seen)
    trace.derived["stages"] = stages  # see models.features.stages
    trace.derived["failed"] = failed  # see models.features.failed
    return trace
