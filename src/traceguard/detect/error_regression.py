"""``error_regression``: a stage's own failures rose above its learned norm.

A span failed when its status is ERROR (what every OpenTelemetry
instrumentation sets for an exception, a 5xx on a server, a failed request on
a client, a gRPC error). Its failure is the stage's *own* when none of its
children failed: a caller that only passes a failure up is not where it came
from, so the culprit of a fault is the deepest stage that fails, and its
callers, whose own failures do not rise, open nothing.

Every stage learns the share of its calls that fail on their own
(``models.rates``, direction up): a stage that fails 20 % of the time by
design is normal, and one failed request at that rate is no finding. A
significant rise opens a stage-level finding (``evidence.signal =
"errors"``) that the incident tracker turns into an incident, with the
baseline and current rates, the counts, exemplar traces (and through them
their logs) and, when it is over, its resolution. Rates learn from every
trace, flagged or not; a window with a rise is never learned.

Calls are counted per window for every stage (in C); failures are observed
as they happen, with their trace as an exemplar.
"""

from __future__ import annotations

from traceguard.config import ErrorsConfig
from traceguard.detect.base import rate_change_finding
from traceguard.models.features import stages
from traceguard.models.rates import RateChange, RateModel, WindowCalls
from traceguard.records import STATUS_ERROR, Anomaly, AnomalyKind, Span, Trace

Stage = tuple[str, str, int]


def own_failures(trace: Trace) -> list[Span]:
    """The failed spans none of whose children failed, in span order."""
    failed = [span for span in trace.spans if span.status == STATUS_ERROR]
    if not failed:
        return failed
    children = trace.children
    return [span for span in failed
            if not any(child.status == STATUS_ERROR for child in children.get(span.span_id, ()))]


class ErrorRegression:
    kind = AnomalyKind.ERROR_REGRESSION

    def __init__(self, config: ErrorsConfig) -> None:
        self.rates_ = RateModel(
            "up", window=config.window, persist_windows=config.persist_windows, half_life=config.half_life,
            z=config.z, min_ratio=config.min_ratio, min_calls=config.min_calls,
            min_window_calls=config.min_window_calls, max_keys=config.max_stages,
        )
        self._calls = WindowCalls(config.window, config.max_stages)
        self._released: list[Anomaly] = []

    def detect(self, trace: Trace) -> list[Anomaly]:
        """Counts the trace; its findings come when windows end (``advance``)."""
        self._roll(trace.decided_at)
        self._calls.count(stages(trace), self._keep)
        failed = own_failures(trace)
        if failed:
            events: list[RateChange] = []
            now, trace_hex = trace.decided_at, trace.trace_id.hex()
            for span in failed:
                self.rates_.observe((span.service, span.name, span.kind), 0, 1, now, span.end, trace_hex, events)
            self._release(events, now)
        return []

    def _keep(self, key: Stage) -> bool:
        return key in self.rates_.keys_ or len(self.rates_.keys_) < self.rates_.max_keys

    def _roll(self, now: int) -> None:
        ended = self._calls.roll(now)
        if ended is not None:
            self._end_window(*ended, now)

    def _end_window(self, index: int, calls: dict[Stage, int], now: int) -> None:
        """The window's calls join the stages' rates (their failures already did)."""
        at = index * self.rates_.window
        events: list[RateChange] = []
        for key in sorted(calls):  # sorted: replays agree
            self.rates_.observe(key, calls[key], 0, at, 0, "", events)
        self._release(events, now)

    def _release(self, events: list[RateChange], now: int) -> None:
        self._released.extend(rate_change_finding(
            self.kind, event, now, signal="errors",
            what=f"calls of {event.key[0]} '{event.key[1]}' that failed on their own",
            evidence={"current_failed": event.current_hits},
        ) for event in events)

    def learn(self, trace: Trace, flagged: frozenset[AnomalyKind]) -> None:
        """The rates count every trace in ``detect``, flagged or not."""

    def advance(self, now: int) -> list[Anomaly]:
        """Time passes without traces too: a window that ended is handed over and closed."""
        self._roll(now)
        events: list[RateChange] = []
        self.rates_.advance(now, events)
        self._release(events, now)
        released, self._released = self._released, []
        return released

    def flush(self, now: int) -> list[Anomaly]:
        self._end_window(*self._calls.take(), now)
        events: list[RateChange] = []
        self.rates_.flush(events)
        self._release(events, now)
        released, self._released = self._released, []
        return released

    def state(self) -> dict:
        return {"rates": self.rates_.state()}

    def restore(self, state: dict) -> None:
        self.rates_.restore(state.get("rates", []))
