"""Process metrics: declared once here, kept in prometheus_client objects.

Every metric traceguard exports is a line of ``DECLARED``: its name, type,
HELP text and label names, and the label values whose series exist from the
start (zero-initialised, so a rate or an alert on them works before the
first event). Every bound that drops or evicts something counts it here, so
nothing is lost silently. Stages hold a ``Metrics`` passed in at
construction; each ``Metrics`` is its own registry (tests and benchmarks run
several pipelines in one process). ``python -m traceguard.metrics`` prints
the README's table of them.
"""

from __future__ import annotations

import itertools
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import disable_created_metrics
from prometheus_client.core import CounterMetricFamily

from traceguard import __version__

disable_created_metrics()  # no *_created series: nobody graphs when a counter was made

# Upper bounds (seconds) of the latency histograms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TRANSPORTS = ("grpc", "http")
_SIGNALS = ("traces", "logs")
_REFUSALS = ("overloaded", "unauthenticated", "undecodable", "too_large", "too_slow", "unsupported",
             "receiving_bound", "wal_full", "store_failing")
_DECISIONS = ("quiet", "max_age", "evicted", "flush")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter (incremented), counted (a counter read at scrape time), gauge (read at scrape time), histogram
    help: str
    labels: tuple[str, ...] = ()
    zero: tuple[tuple[str, ...], ...] = ()  # label values whose series exist from the start


def _each(*values: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(itertools.product(*values))


DECLARED: tuple[Metric, ...] = (
    # receiving
    Metric("traceguard_spans_received_total", "counter", "Spans received (valid or not), by transport.",
           ("transport",), _each(_TRANSPORTS)),
    Metric("traceguard_spans_rejected_total", "counter",
           "Spans rejected as invalid (ids, times); the rest of their request is kept.", ("transport",),
           _each(_TRANSPORTS)),
    Metric("traceguard_logs_received_total", "counter", "Log records received (valid or not), by transport.",
           ("transport",), _each(_TRANSPORTS)),
    Metric("traceguard_logs_rejected_total", "counter", "Log records rejected as invalid.", ("transport",),
           _each(_TRANSPORTS)),
    Metric("traceguard_requests_refused_total", "counter",
           "Export requests answered with an error (the client keeps the data and may retry), by why.",
           ("transport", "signal", "reason"), _each(_TRANSPORTS, _SIGNALS, _REFUSALS)),
    Metric("traceguard_export_processing_seconds", "histogram", "Time to take in one export request."),
    Metric("traceguard_connections_refused_total", "counter",
           "Connections closed at once past serve.max_connections.", ("listener",)),
    Metric("traceguard_connections_timed_out_total", "counter",
           "Connections closed for not sending a whole request within serve.read_timeout.", ("listener",)),
    Metric("traceguard_api_refused_total", "counter", "API requests refused (401: no or a wrong token).",
           ("status",), (("401",),)),
    Metric("traceguard_span_events_total", "counter", "Span events turned into log records."),
    # replay input
    Metric("traceguard_replay_corrupt_total", "counter", "Replay input lines or messages that could not be read."),
    Metric("traceguard_replay_out_of_order_total", "counter", "Replay records merged in out of time order."),
    # assembling
    Metric("traceguard_spans_accepted_total", "counter", "Spans taken into the assembler."),
    Metric("traceguard_duplicate_spans_total", "counter", "Spans that came twice within a trace (kept once)."),
    Metric("traceguard_late_spans_total", "counter", "Spans that came after their trace was decided (late_span)."),
    Metric("traceguard_spans_far_ahead_total", "counter",
           "Spans that ended more than assembler.max_ahead past the newest event time (they do not move it alone)."),
    Metric("traceguard_traces_decided_total", "counter", "Traces decided, by why (evicted: at an in-flight bound).",
           ("reason",), _each(_DECISIONS)),
    Metric("traceguard_traces_evicted_total", "counter",
           "Traces decided early at assembler.max_spans_in_flight or max_traces_in_flight."),
    Metric("traceguard_traces_abandoned_total", "counter",
           "Traces not decided within serve.shutdown_timeout (left to the write-ahead log).", ("reason",),
           (("shutdown_timeout",),)),
    Metric("traceguard_spans_abandoned_total", "counter", "The spans of those traces.", ("reason",),
           (("shutdown_timeout",),)),
    Metric("traceguard_spans_in_flight", "gauge", "Spans held in traces not decided yet."),
    Metric("traceguard_traces_in_flight", "gauge", "Traces not decided yet."),
    Metric("traceguard_decision_lag_seconds", "histogram", "How late a due trace was decided (wall time)."),
    # logs
    Metric("traceguard_logs_indexed_total", "counter", "Log records indexed by trace id."),
    Metric("traceguard_log_records_indexed", "gauge", "Log records held in the index."),
    Metric("traceguard_logs_evicted_total", "counter",
           "Log records leaving the index unlinked: ttl (logs.ttl passed with no finding to link them to: normal) "
           "or bound (logs.max_records).", ("reason",), (("ttl",), ("bound",))),
    Metric("traceguard_logs_dropped_total", "counter",
           "Log records not kept: per_trace_bound (past logs.max_per_trace for one trace) or duplicate (the trace "
           "holds the same record already: delivered again after a rebalance or an exporter's retry).",
           ("reason",), (("per_trace_bound",), ("duplicate",))),
    # detection
    Metric("traceguard_anomalies_total", "counter", "Findings written to the sinks, by kind and service.",
           ("kind", "service")),
    Metric("traceguard_findings_attached_total", "counter",
           "Per-trace findings kept on their incident instead of being written one by one.", ("kind",)),
    Metric("traceguard_incident_updates_total", "counter", "Incident state changes written.", ("state",),
           (("open",), ("resolved",))),
    Metric("traceguard_incidents_open", "gauge", "Incidents open now."),
    Metric("traceguard_latency_untracked_samples_total", "counted",
           "Latency samples of stages (or of a stage's pods) past learned.latency.max_stages, or past 64 pods "
           "a stage (not learned)."),
    Metric("traceguard_series_untracked_windows_total", "counted",
           "Stage windows not kept for the web view's stage pages (stages past ui.series_stages)."),
    Metric("traceguard_context_outlived_parent_routine_stages", "gauge",
           "Stages whose children routinely outlive them (learned as their norm)."),
    Metric("traceguard_context_outlived_parent_held_dropped_total", "counted",
           "Outlived-parent occurrences held for a stage not yet judged that were dropped at the bound."),
    # store
    Metric("traceguard_finding_store_seconds", "histogram", "Time from a finding's detection to its stored write."),
    Metric("traceguard_store_backlog", "gauge", "Store writes held while the store refuses them (a full disk)."),
    Metric("traceguard_store_dropped_total", "counted", "Store writes dropped past the backlog bound (lost)."),
    Metric("traceguard_store_deleted_total", "counter", "Rows deleted by the store's retention (store.max_age, "
           "store.max_bytes).", ("reason",), (("age",), ("size",))),
    # serve
    Metric("traceguard_tick_errors_total", "counter", "Ticks of serve's decision loop that failed (logged)."),
    Metric("traceguard_wal_records_total", "counter", "Requests written to the write-ahead log."),
    Metric("traceguard_wal_syncs_total", "counter", "fsyncs of the write-ahead log (serve.wal_fsync)."),
    Metric("traceguard_wal_write_errors_total", "counter", "Write-ahead log writes that failed (a full disk)."),
    Metric("traceguard_wal_corrupt_records_total", "counter", "Write-ahead log records cut off at a replay."),
    Metric("traceguard_wal_replayed_records_total", "counter", "Write-ahead log records replayed at start."),
    Metric("traceguard_wal_bytes", "gauge", "Size of the write-ahead log."),
    Metric("traceguard_wal_segments", "gauge", "Segment files of the write-ahead log."),
    Metric("traceguard_forwarded_total", "counter", "Requests forwarded to serve.forward_to.", ("signal",),
           _each(_SIGNALS)),
    Metric("traceguard_forward_failures_total", "counter", "Forwarding attempts that failed.", ("signal",),
           _each(_SIGNALS)),
    Metric("traceguard_forward_dropped_total", "counter",
           "Requests not forwarded: the queue (serve.forward_queue) was full.", ("signal",), _each(_SIGNALS)),
    Metric("traceguard_forward_queue", "gauge", "Requests waiting to be forwarded."),
    # consume
    Metric("traceguard_kafka_records_total", "counter", "Kafka records read.", ("topic",)),
    Metric("traceguard_kafka_poison_records_total", "counter", "Kafka records that could not be decoded (skipped).",
           ("topic",)),
    Metric("traceguard_kafka_dead_letters_total", "counter", "Undecodable records copied to the dead-letter topic.",
           ("topic",)),
    Metric("traceguard_kafka_produce_failures_total", "counter", "Findings that could not be produced to a topic.",
           ("topic",)),
    Metric("traceguard_kafka_spans_already_decided_total", "counter",
           "Spans of records read again whose traces were already decided (skipped)."),
    Metric("traceguard_kafka_straddlers_unrecorded_total", "counter",
           "Decided traces across a commit point left out of its metadata (read again after a restart)."),
    Metric("traceguard_kafka_traces_dropped_on_revoke_total", "counter",
           "Undecided traces of revoked partitions (their new owner reads them again)."),
    Metric("traceguard_kafka_commits_total", "counter", "Offset commits."),
    Metric("traceguard_kafka_commit_failures_total", "counter", "Offset commits that failed (retried)."),
    Metric("traceguard_kafka_rebalances_total", "counter", "Consumer group rebalances."),
    Metric("traceguard_kafka_backpressure_pauses_total", "counter",
           "Times the consumer paused its partitions because the assembler was full."),
    Metric("traceguard_kafka_assigned_partitions", "gauge", "Partitions assigned to this member."),
    Metric("traceguard_kafka_paused_partitions", "gauge", "Partitions paused for back-pressure."),
    Metric("traceguard_kafka_buffered_records", "gauge", "Records fetched and not yet taken in."),
    # a consumer group's one judge (consume.decided_topic)
    Metric("traceguard_group_traces_forwarded_total", "counter", "Decided traces this member sent to the judge."),
    Metric("traceguard_group_traces_judged_total", "counter", "Traces this member judged as the group's judge."),
    Metric("traceguard_group_traces_judged_before_total", "counter",
           "Traces a member sent again (decided again after a crash or a rebalance), judged once."),
    Metric("traceguard_group_traces_out_of_order_total", "counter",
           "Traces that came after the judge had passed their decision time (their member's clock started "
           "over), judged at once."),
    Metric("traceguard_group_traces_judged_early_total", "counter",
           "Traces the judge judged before every partition's watermark had passed them (consume.judge_max_waiting)."),
    Metric("traceguard_group_snapshots_total", "counter", "Judge states saved to the state topic."),
    Metric("traceguard_group_judging", "gauge", "1 while this member is the group's judge."),
    Metric("traceguard_group_traces_waiting", "gauge",
           "Traces the judge holds until every partition's watermark has passed them."),
)
_DECLARED = {metric.name: metric for metric in DECLARED}


class _Counted:
    """The counters read at scrape time (a count kept by the code that drops)."""

    def __init__(self) -> None:
        self.reads: dict[str, Callable[[], float]] = {}

    def collect(self):
        for name, read in sorted(self.reads.items()):
            family = CounterMetricFamily(name.removesuffix("_total"), _DECLARED[name].help)
            family.add_metric([], read())
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._objects: dict[str, Counter | Gauge | Histogram] = {}
        self._children: dict[tuple, Counter | Gauge | Histogram] = {}
        self._counted = _Counted()
        for metric in DECLARED:
            if metric.kind == "counted":
                continue
            kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[metric.kind]
            extra = {"buckets": LATENCY_BUCKETS} if metric.kind == "histogram" else {}
            made = kind(metric.name, metric.help, metric.labels, registry=self.registry, **extra)
            for values in metric.zero:
                made.labels(*values)
            self._objects[metric.name] = made
        self.registry.register(self._counted)
        ProcessCollector(registry=self.registry)
        build = Gauge("traceguard_build_info", "The running traceguard: version and Python (value 1).",
                      ("version", "python"), registry=self.registry)
        build.labels(__version__, platform.python_version()).set(1)

    def _series(self, name: str, labels: dict[str, str]):
        """The series, looked up once per name and labels: prometheus_client's
        ``labels()`` validates and locks on every call, a tenth of the structural
        detectors' time when it ran on every increment."""
        key = (name, *labels.items())
        series = self._children.get(key)
        if series is None:
            made = self._objects[name]  # KeyError: not declared in DECLARED
            series = self._children[key] = made.labels(**labels) if labels else made
        return series

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        self._series(name, labels).inc(value)

    def counter(self, name: str, **labels: str) -> Callable[..., None]:
        """``inc`` of one series, looked up once, for per-trace paths."""
        return self._series(name, labels).inc

    def observe(self, name: str, seconds: float) -> None:
        """One sample of a latency histogram."""
        self._objects[name].observe(seconds)

    def observe_many(self, name: str, samples: Iterable[float]) -> None:
        observe = self._objects[name].observe
        for seconds in samples:
            observe(seconds)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time."""
        self._objects[name].set_function(read)

    def counted(self, name: str, read: Callable[[], float]) -> None:
        """A counter read at scrape time (the code that counts keeps the number)."""
        if _DECLARED[name].kind != "counted":
            raise KeyError(f"{name} is not declared as a counted metric")
        self._counted.reads[name] = read

    def get(self, name: str, **labels: str) -> float:
        """A counter's value for exactly these labels (every series summed if none given)."""
        return sum(value for sample_labels, value in self._samples(name) if not labels or sample_labels == labels)

    def gauges(self) -> dict[str, float]:
        return {name: value for name, made in self._objects.items() if isinstance(made, Gauge)
                for _, value in self._samples(name)}

    def _samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        if name in self._counted.reads:
            return [({}, self._counted.reads[name]())]
        sample_name = name if _DECLARED[name].kind != "histogram" else f"{name}_count"
        return [(sample.labels, sample.value) for family in self._objects[name].collect()
                for sample in family.samples if sample.name == sample_name]

    def snapshot(self) -> dict[str, object]:
        """Counters and gauges for a summary: unlabelled ones as a number, labelled ones
        as {"label=value,...": number} of the series that are not zero."""
        out: dict[str, object] = {}
        for metric in DECLARED:
            if metric.kind == "histogram" or (metric.kind == "counted" and metric.name not in self._counted.reads):
                continue
            samples = self._samples(metric.name)
            if metric.labels:
                out[metric.name] = {",".join(f"{k}={v}" for k, v in sorted(labels.items())): _number(value)
                                    for labels, value in sorted(samples, key=lambda s: sorted(s[0].items())) if value}
                if not out[metric.name]:
                    del out[metric.name]
            else:
                out[metric.name] = _number(samples[0][1]) if samples else 0
        return out


def _number(value: float) -> int | float:
    return int(value) if value == int(value) else value


def prometheus_text(metrics: Metrics) -> bytes:
    """The metrics in the Prometheus text exposition format."""
    return generate_latest(metrics.registry)


def markdown_table() -> str:
    """The README's table of metrics, from the declarations."""
    rows = ["| metric | type | labels | what it counts |", "|---|---|---|---|"]
    for metric in DECLARED:
        kind = "counter" if metric.kind == "counted" else metric.kind
        rows.append(f"| `{metric.name}` | {kind} | {', '.join(metric.labels) or '–'} | {metric.help} |")
    rows.append("| `traceguard_build_info` | gauge | version, python | The running traceguard (value 1). |")
    rows.append("| `process_*` | | | CPU seconds, resident memory, open files, start time (prometheus_client). |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
