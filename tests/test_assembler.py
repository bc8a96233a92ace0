from builders import MS, T0, row, tid
from traceguard.assemble import EventTimeClock, TraceAssembler
from traceguard.config import AssemblerConfig
from traceguard.metrics import Metrics

S = 1000 * MS


class Harness:
    def __init__(self, **config):
        config.setdefault("allowed_lateness", 0)
        self.config = AssemblerConfig(decision_wait=30, max_trace_age=300, **config)
        self.clock = EventTimeClock(self.config.allowed_lateness, self.config.max_ahead)
        self.metrics = Metrics()
        self.decided = []
        self.late = []
        self.assembler = TraceAssembler(self.config, self.clock, self.decided.append,
                                        lambda trace_id, span, at: self.late.append((span, at)), self.metrics)

    def add(self, *rows):
        self.assembler.add(rows)
        self.assembler.advance()

    def tick(self, at_ms: float):
        """Moves event time with a span of an unrelated trace."""
        self.add(row(10_000 + int(at_ms), 1, start_ms=at_ms, end_ms=at_ms))

    def ids(self):
        return [(t.trace_id, t.reason) for t in self.decided if t.trace_id != tid(0)]


def test_rooted_trace_is_decided_after_the_quiet_period_not_before():
    h = Harness()
    h.add(row(1, 1, end_ms=100), row(1, 2, 1, end_ms=90))
    h.tick(100 + 29_999)
    assert all(t.trace_id != tid(1) for t in h.decided)
    h.tick(100 + 30_000)
    (trace,) = [t for t in h.decided if t.trace_id == tid(1)]
    assert trace.reason == "quiet" and trace.root.span_id == (1).to_bytes(8, "big")
    assert len(trace.spans) == 2 and trace.children[(1).to_bytes(8, "big")][0].span_id == (2).to_bytes(8, "big")


def test_a_new_span_restarts_the_quiet_period():
    h = Harness()
    h.add(row(1, 1, end_ms=100))
    h.tick(20_000)
    h.add(row(1, 2, 1, end_ms=25_000))
    h.tick(50_000)
    assert not any(t.trace_id == tid(1) for t in h.decided)
    h.tick(55_000)
    assert any(t.trace_id == tid(1) for t in h.decided)


def test_rootless_trace_waits_for_max_age():
    h = Harness()
    h.add(row(1, 2, 1, end_ms=100))
    h.tick(200_000)
    assert not any(t.trace_id == tid(1) for t in h.decided)
    h.tick(100 + 300_000)
    (trace,) = [t for t in h.decided if t.trace_id == tid(1)]
    assert trace.reason == "max_age" and trace.root is None


def test_allowed_lateness_holds_decisions_back():
    h = Harness(allowed_lateness=5)
    h.add(row(1, 1, end_ms=100))
    h.tick(100 + 34_000)
    assert not any(t.trace_id == tid(1) for t in h.decided)
    h.tick(100 + 35_000)
    assert any(t.trace_id == tid(1) for t in h.decided)


def test_span_after_the_decision_is_late_not_a_new_trace():
    h = Harness()
    h.add(row(1, 1, end_ms=100))
    h.tick(40_000)
    h.add(row(1, 2, 1, end_ms=90))
    assert [s.span_id for s, _ in h.late] == [(2).to_bytes(8, "big")]
    h.assembler.flush()
    assert sum(t.trace_id == tid(1) for t in h.decided) == 1
    assert h.metrics.get("traceguard_late_spans_total") == 1


def test_decided_ids_are_forgotten_after_their_ttl():
    h = Harness(decided_ttl=60)
    h.add(row(1, 1, end_ms=100))
    h.tick(40_000)
    h.tick(200_000)
    h.add(row(1, 2, 1, end_ms=90))
    assert not h.late and h.assembler.traces_in_flight >= 1


def test_undecided_looks_ids_up_instead_of_walking_every_decided_trace():
    # every Kafka record and write-ahead-log request asks this; walking the
    # decided memory (200,000 ids by default) cost ~50 ms per record
    h = Harness()
    for n in (1, 2, 3):
        h.add(row(n, 1, end_ms=n))
    h.assembler.flush()
    walked = []

    class Watched(type(h.assembler._decided)):
        def __iter__(self):
            walked.append("iter")
            return super().__iter__()

        def keys(self):
            walked.append("keys")
            return super().keys()

    h.assembler._decided = Watched(h.assembler._decided)
    assert h.assembler.undecided({tid(1), tid(3), tid(7)}) == {tid(7)}
    assert not walked


def test_decided_memory_is_bounded():
    h = Harness(decided_memory=2)
    for n in (1, 2, 3):
        h.add(row(n, 1, end_ms=n))
    h.assembler.flush()
    h.add(row(1, 9, 1, end_ms=5))
    assert not h.late  # trace 1 was pushed out of the decided memory


def test_at_the_trace_bound_the_oldest_is_decided_early_and_counted():
    h = Harness(max_traces_in_flight=2)
    h.add(row(1, 1), row(2, 1), row(3, 1))
    assert [(t.trace_id, t.reason) for t in h.decided] == [(tid(1), "evicted")]
    assert h.metrics.get("traceguard_traces_evicted_total") == 1
    assert h.assembler.traces_in_flight == 2


def test_at_the_span_bound_the_oldest_traces_go_first():
    h = Harness(max_spans_in_flight=3)
    h.add(row(1, 1), row(1, 2, 1), row(2, 1), row(2, 2, 1))
    assert [t.trace_id for t in h.decided] == [tid(1)]
    assert h.assembler.spans_in_flight == 2 and h.assembler.room() == 1


def test_flush_decides_everything_in_arrival_order():
    h = Harness()
    h.add(row(2, 1), row(1, 1), row(2, 2, 1))
    h.assembler.flush()
    assert [(t.trace_id, t.reason) for t in h.decided] == [(tid(2), "flush"), (tid(1), "flush")]
    assert h.assembler.spans_in_flight == 0


def test_duplicate_spans_are_counted_once():
    h = Harness()
    h.add(row(1, 1), row(1, 1), row(1, 2, 1))
    h.assembler.flush()
    assert len(h.decided[0].spans) == 2
    assert h.metrics.get("traceguard_duplicate_spans_total") == 1


def test_spans_without_an_end_arrive_at_the_watermark():
    h = Harness()
    h.tick(50_000)
    h.add(row(1, 1, start_ms=49_000, end_ms=None))
    h.tick(50_000 + 29_000)
    assert not any(t.trace_id == tid(1) for t in h.decided)
    h.tick(50_000 + 30_000)
    assert any(t.trace_id == tid(1) for t in h.decided)


def test_an_unfinished_span_first_on_a_fresh_clock_is_not_overdue():
    """The first span a fresh clock sees (a consumer that just took over a partition)
    may be unfinished: it arrives when it started, not at event time 0, so its trace
    waits for the rest like any other instead of being decided without its root."""
    h = Harness()
    h.add(row(1, 2, 1, start_ms=1_000, end_ms=None))
    h.tick(2_000)
    h.add(row(1, 1, start_ms=0, end_ms=2_500))
    h.tick(2_500 + 30_000)
    (trace,) = [t for t in h.decided if t.trace_id == tid(1)]
    assert trace.root is not None and len(trace.spans) == 2 and not h.late


def test_advance_can_decide_in_chunks():
    h = Harness()
    h.assembler.add([row(n, 1, end_ms=100) for n in range(1, 6)])
    h.clock.observe(T0 + 40_000 * MS, 0, tid(99))
    assert h.assembler.advance(limit=2) is True
    assert len(h.decided) == 2
    assert h.assembler.advance(limit=2) is True
    assert h.assembler.advance(limit=2) is False
    assert [t.trace_id for t in h.decided] == [tid(n) for n in range(1, 6)]


def test_a_flush_with_a_deadline_stops_there_and_counts_what_it_dropped():
    """Shutdown within its grace period: past the deadline nothing more is decided;
    the traces left are dropped and counted, never silently."""
    import time

    from traceguard.assemble import EventTimeClock, TraceAssembler
    from traceguard.config import AssemblerConfig
    from traceguard.metrics import Metrics

    decided: list = []
    metrics = Metrics()
    assembler = TraceAssembler(AssemblerConfig(), EventTimeClock(0), decided.append, lambda *a: None, metrics)
    assembler.add([row(n, 1, end_ms=10) for n in range(1, 301)] + [row(n, 2, 1, end_ms=5) for n in range(1, 301)])
    assert assembler.flush(deadline=time.monotonic() - 1) == 300
    assert decided == [] and assembler.spans_in_flight == 0
    snapshot = metrics.snapshot()
    assert snapshot["traceguard_traces_abandoned_total"] == {"reason=shutdown_timeout": 300}
    assert snapshot["traceguard_spans_abandoned_total"] == {"reason=shutdown_timeout": 600}
    again = TraceAssembler(AssemblerConfig(), EventTimeClock(0), decided.append, lambda *a: None, Metrics())
    again.add([row(n, 1, end_ms=10) for n in range(1, 301)])
    assert again.flush(deadline=time.monotonic() + 3600) == 0 and len(decided) == 300


YEARS_MS = 100 * 365 * 86_400_000


def test_one_span_far_ahead_does_not_move_event_time():
    """A client clock a century off (or a forged end time) must not make every trace
    due at once, for good: the span is counted and its own trace waits."""
    h = Harness()
    h.add(row(1, 1, end_ms=100), row(1, 2, 1, end_ms=90))
    h.add(row(2, 1, start_ms=YEARS_MS, end_ms=YEARS_MS + 10))
    h.add(row(3, 1, start_ms=YEARS_MS, end_ms=YEARS_MS + 10))  # a second one: not yet three traces
    h.tick(20_000)
    assert not h.decided[1:] and h.clock.now() == T0 + 20_000 * MS
    h.tick(100 + 30_000)
    assert h.ids() == [(tid(1), "quiet")]  # decided as if the far spans had not come
    assert h.metrics.get("traceguard_spans_far_ahead_total") == 2


def test_event_time_follows_a_real_jump_once_three_traces_are_that_far_ahead():
    """A gap in the input (two days without traces in a replay): spans of three
    traces past ``max_ahead``, with nothing in between, move the watermark to the earliest."""
    h = Harness()
    h.add(row(1, 1, end_ms=100))
    later = 2 * 86_400_000
    h.add(row(2, 1, start_ms=later, end_ms=later + 30))
    h.add(row(3, 1, start_ms=later, end_ms=later + 10))
    assert h.clock.now() == T0 + 100 * MS
    h.add(row(4, 1, start_ms=later, end_ms=later + 20))
    assert h.clock.now() == T0 + (later + 10) * MS
    assert (tid(1), "quiet") in h.ids() and h.metrics.get("traceguard_spans_far_ahead_total") == 3


def test_spans_far_ahead_between_spans_that_move_event_time_never_move_it():
    """A client whose clock is off, among healthy traffic: its traces come one at a
    time between spans that move the watermark normally, so they never confirm a jump."""
    h = Harness()
    for n in range(10):
        h.tick(1_000 * n)
        h.add(row(100 + n, 1, start_ms=YEARS_MS, end_ms=YEARS_MS + n))
    assert h.clock.now() == T0 + 9_000 * MS
    assert h.metrics.get("traceguard_spans_far_ahead_total") == 10
