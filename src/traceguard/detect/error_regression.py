"""``error_regression``: a stage's own failures rose above its learned norm.

A span failed when its status is ERROR (what every OpenTelemetry
instrumentation sets for an exception, a 5xx on a server, a failed request on
a client, a gRPC error), or when its status was left UNSET and it recorded an
exception event or logged at ERROR or above (Go's ``RecordError`` does not set
the status; an explicit OK says the instrumentation judged the exception
handled). Its failure is the stage's *own* when none of its
children failed: a caller that only passes a failure up is not where it came
from, so the culprit of a fault is the deepest stage that fails, and its
callers, whose own failures do not rise, open nothing.

Every stage learns the share of its calls that fail on their own
(``models.rates``, direction up): a stage that fails 20 % of the time by
design is normal, and one failed request at that rate is no finding. A
significant rise opens a stage-level finding (``evidence.signal =
"errors"``) that the incident tracker turns into an incident, with the
baseline and current rates, the counts, what the failures were (exception
types from the spans' exception events, else status codes: ``reasons``, with
their recent and usual counts), exemplar traces (and through them their
logs) and, when it is over, its resolution. Rates learn from every
trace, flagged or not; a window with a rise is never learned.

Calls are counted per window for every stage (in C); failures are observed
as they happen, with their trace as an exemplar.
"""

from __future__ import annotations

from collections import Counter, deque

from traceguard.config import ErrorsConfig
from traceguard.decode.common import PER_CALL_ATTRIBUTES
from traceguard.detect.base import rate_change_finding
from traceguard.detect.stage_rates import Stage, StageRateDetector
from traceguard.models.features import failed as spans_failed
from traceguard.models.rates import RateChange, RateModel, WindowCalls
from traceguard.models.series import StageSeries
from traceguard.records import SEVERITY_ERROR, STATUS_ERROR, STATUS_UNSET, Anomaly, AnomalyKind, LogRow, Span, Trace

_REASONS = 5  # failure reasons listed in a finding
_RECENT_WINDOWS = 4


def failure_reason(span: Span, logs: list[LogRow]) -> str:
    """What a failure was: the type of an exception event (or error line) on the
    span, else its response status code, else "status ERROR"."""
    for log in logs:
        if log.span_id == span.span_id and log.severity_number >= SEVERITY_ERROR:
            head = log.body.split("\n", 1)[0]
            kind, colon, _ = head.partition(":")
            return (kind if colon else head)[:120]
    for key, value in span.attrs or ():
        if key in PER_CALL_ATTRIBUTES:  # the response status codes
            return f"{key.split('.')[0]} {value}"
    return "status ERROR"


class _Reasons:
    """A stage's failure reasons: this window's, the last few windows', and the usual ones (calm windows)."""

    __slots__ = ("window", "recent", "usual")

    def __init__(self) -> None:
        self.window: Counter[str] = Counter()
        self.recent: deque[Counter[str]] = deque()
        self.usual: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        """Counts a failure; bounded: past a few distinct reasons a window counts the rest as "other"."""
        if reason not in self.window and len(self.window) >= 4 * _REASONS:
            reason = "other"
        self.window[reason] += 1

    def roll(self, calm: bool) -> None:
        """Ends the window. The window leaving the recent ones joins the usual
        reasons if the stage is ``calm`` now: a rise is known only windows after
        it began, by then its windows are still recent."""
        if len(self.recent) == _RECENT_WINDOWS:
            oldest = self.recent.popleft()
            if calm:
                self.usual.update(oldest)
                if len(self.usual) > 4 * _REASONS:  # bounded: the most frequent stay
                    self.usual = Counter(dict(self.usual.most_common(2 * _REASONS)))
        self.recent.append(self.window)
        self.window = Counter()

    def recent_total(self) -> Counter[str]:
        total = Counter(self.window)
        for window in self.recent:
            total.update(window)
        return total


def failed_spans(trace: Trace) -> list[Span]:
    """The spans with status ERROR, and those with status UNSET that logged an
    error of their own (an exception event is one), in span order."""
    failed = spans_failed(trace)
    if trace.logs:
        logged = {log.span_id for log in trace.logs if log.severity_number >= SEVERITY_ERROR}
        if logged and any(trace.by_id[span_id].status == STATUS_UNSET for span_id in logged if span_id in trace.by_id):
            failed = [span for span in trace.spans if span.status == STATUS_ERROR
                      or (span.status == STATUS_UNSET and span.span_id in logged)]
    return failed


def own_failures(trace: Trace) -> list[Span]:
    """The failed spans none of whose children failed, in span order."""
    failed = failed_spans(trace)
    if not failed:
        return failed
    ids = {span.span_id for span in failed}
    children = trace.children
    return [span for span in failed if not any(child.span_id in ids for child in children.get(span.span_id, ()))]


class ErrorRegression(StageRateDetector):
    kind = AnomalyKind.ERROR_REGRESSION

    def __init__(self, config: ErrorsConfig, calls: WindowCalls | None = None,
                 series: StageSeries | None = None) -> None:
        super().__init__(RateModel(
            "up", window=config.window, persist_windows=config.persist_windows, half_life=config.half_life,
            z=config.z, min_ratio=config.min_ratio, min_calls=config.min_calls,
            min_window_calls=config.min_window_calls, max_keys=config.max_stages,
        ), calls)
        self._reasons: dict[Stage, _Reasons] = {}  # stages that failed (bounded like the rates)
        # Calls of the stages that never failed: their baseline, kept as the rate model
        # would keep it (decayed once per window with calls) but without a rate per
        # stage and window; a stage's first failure starts its rate from it.
        self._quiet: dict[Stage, float] = {}
        self._decay = 0.5 ** (config.window / config.half_life) if config.half_life else 1.0
        self._series = series  # each window's calls and own failures per stage, for the stage page

    def detect(self, trace: Trace) -> list[Anomaly]:
        """Counts the trace; its findings come when windows end (``advance``)."""
        self._count(trace)
        if not trace.logs and not spans_failed(trace):  # nearly every trace
            return []
        failed = own_failures(trace)
        if failed:
            events: list[RateChange] = []
            now, trace_hex = trace.decided_at, trace.trace_id.hex()
            for span in failed:
                key = (span.service, span.name, span.kind)
                if key not in self.rates_.keys_:
                    self.rates_.seed(key, self._quiet.pop(key, 0.0))
                self.rates_.observe(key, 0, 1, now, span.end, trace_hex, events)
                reasons = self._reasons.get(key)
                if reasons is None and len(self._reasons) < self.rates_.max_keys:
                    reasons = self._reasons[key] = _Reasons()
                if reasons is not None:
                    reasons.add(failure_reason(span, trace.logs))
            self._release(events, now)
        return []

    def _keep(self, key: Stage) -> bool:
        return key in self.rates_.keys_ or key in self._quiet or len(self._quiet) < self.rates_.max_keys

    def _end_window(self, index: int, calls: dict[Stage, int], now: int) -> None:
        """The window's calls join the stages' rates (their failures already did), or
        the baselines of the stages that never failed; its failure reasons join the
        recent ones."""
        at = index * self.rates_.window
        events: list[RateChange] = []
        rated, quiet, decay, room = self.rates_.keys_, self._quiet, self._decay, self.rates_.max_keys
        if self._series is not None:
            for key, count in calls.items():
                reasons = self._reasons.get(key)
                self._series.errors(key, at, count, sum(reasons.window.values()) if reasons is not None else 0)
        for key in sorted(calls):  # sorted: replays agree
            if key in rated:
                self.rates_.observe(key, calls[key], 0, at, 0, "", events)
            elif key in quiet or len(quiet) < room:
                quiet[key] = quiet.get(key, 0.0) * decay + calls[key]
        for key, reasons in self._reasons.items():
            reasons.roll(calm=not self.rates_.is_open(key))
        self._release(events, now)

    def _changes(self, events: list[RateChange], now: int) -> list[Anomaly]:
        return [rate_change_finding(
            self.kind, event, now, signal="errors",
            what=f"calls of {event.key[0]} '{event.key[1]}' that failed on their own",
            evidence={"current_failed": event.current_hits, "reasons": self._rose(event.key)},
        ) for event in events]

    def _rose(self, key: Stage) -> list[dict]:
        """The failure reasons of the recent windows, most frequent first, each with
        its count there and in the usual failures (what rose is what is new or more)."""
        reasons = self._reasons.get(key)
        if reasons is None:
            return []
        recent = reasons.recent_total()
        return [{"reason": reason, "recent": count, "usual": round(reasons.usual.get(reason, 0.0), 1)}
                for reason, count in sorted(recent.items(), key=lambda item: (-item[1], item[0]))[:_REASONS]]

    def state(self) -> dict:
        return {**super().state(), "quiet": [[*key, round(calls, 3)] for key, calls in self._quiet.items()]}

    def restore(self, state: dict) -> None:
        super().restore(state)
        for service, operation, span_kind, calls in state.get("quiet", []):
            self._quiet[(str(service), str(operation), int(span_kind))] = float(calls)
