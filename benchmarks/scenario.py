"""Labeled scenario generator: a small shop emulated with the real OpenTelemetry SDK.

Six services (frontend, cart, catalog, checkout, payment, email) each have
their own TracerProvider and LoggerProvider with their own ``service.name``;
spans are real SDK spans (real kinds, CLIENT→SERVER pairs across services,
database CLIENT spans, Kafka PRODUCER/CONSUMER, calls to uninstrumented
external APIs) and logs go through the SDK's logging bridge, so they carry
the trace and span ids of the active span. Event time is simulated: every
span gets explicit start and end times, nothing sleeps, an hour of traffic
takes seconds.

Export is emulated like a BatchSpanProcessor with a 1 s schedule: a span is
exported at the first batch boundary of its service after it ends. The SDK's
ReadableSpans are encoded with the SDK's own OTLP encoder
(opentelemetry-exporter-otlp-proto-common) and written as OTLP/JSON lines the
way the Collector's file exporter writes them (hex ids, integer enums), or as
length-prefixed protobuf.

Faults, each written to ``labels.jsonl`` as the finding it must produce:

========================  ===========================  =========================================
fault                     label kind                   what is done
========================  ===========================  =========================================
never_ended_root          missing_root                 the frontend handler span never ends
never_ended_span          missing_parent               an inner INTERNAL span never ends
background_work           context_outlived_parent      a child keeps running after its parent
late_export               late_span                    a leaf is exported minutes after the rest
exporter_drop             unpaired_client_span         a callee service's spans are dropped
invalid_end               unfinished_span              a leaf ends at 0 or before it started
========================  ===========================  =========================================

Normal traffic that must not be flagged: Kafka consumers finishing after the
request, per-service clock skew of a few ms, cache hits that skip the
database, retries after connection errors and after 503s (natural errors,
recorded as exception events), product lookups that time out in 5 % of
calls and fail their request with a 500 (errors propagate up every span to
the root, and the page is not rendered; HTTP spans record only their 5xx
response code and leave the status UNSET, as many instrumentations do), calls to an external payment API and an SMTP server that have no server
spans, a heavy Pareto tail on single calls, stalls that hold one service for
50–200 ms in a request (a GC pause, CPU starvation), and a cart step that
routinely finishes 1–80 ms after its handler returned (12 % of calls, like
a Node.js callback).

Run ``python -m benchmarks.scenario --out DIR --traces 10000``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import random
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from google.protobuf.json_format import MessageToDict
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

SERVICES = ("frontend", "cart", "catalog", "checkout", "payment", "email")
QUERIES = {
    "SELECT products": "SELECT id, name, price, stock FROM products WHERE id = $1",
    "INSERT orders": "INSERT INTO orders (id, customer_id, total, created_at) VALUES ($1, $2, $3, now())",
}
FAULTS = {
    "skipped_call": "missing_expected_span",
    "never_ended_root": "missing_root",
    "never_ended_span": "missing_parent",
    "background_work": "context_outlived_parent",
    "late_export": "late_span",
    "exporter_drop": "unpaired_client_span",
    "invalid_end": "unfinished_span",
}
# A late export is late in the generator's simulated time only; sent to a live
# receiver it arrives at once, so live runs place every fault but that one.
FOREST_WARMUP_TRACES = 3000
LIVE_FAULTS = tuple(fault for fault in FAULTS if fault != "late_export")
# Faults that also leave out a stage every normal trace of the request has.
ALSO_MISSING_EXPECTED = frozenset({"never_ended_span", "exporter_drop", "late_export"})
OUTLIERS = ("n_plus_one", "slowdown_20x")
MS = 1_000_000
SECOND = 1_000_000_000
BATCH_PERIOD = SECOND
MAX_SPANS_PER_REQUEST = 512
LATE_EXPORT_DELAY = (90 * SECOND, 180 * SECOND)
# Anything exported this long before the newest trace's start can be written.
FLUSH_HORIZON = 10 * 60 * SECOND


@dataclass(frozen=True)
class ErrorFault:
    """From ``start_s`` to ``end_s`` a leaf stage fails in a share ``rate`` of its
    calls with an exception of a type it never raised before; the failure
    propagates: every span above it fails and the request answers 500 without
    rendering its page."""

    service: str
    operation: str
    start_s: float
    end_s: float
    rate: float
    exception: str = "redis.exceptions.ResponseError"
    message: str = "MOVED 3999 10.0.7.{node}:6379"
    pod: int | None = None  # only this pod's calls (``ScenarioConfig.pods``), or all

    @property
    def name(self) -> str:
        return f"errors_{self.rate:.0%}" + (f"_pod{self.pod}" if self.pod is not None else "")


@dataclass
class ScenarioConfig:
    traces: int = 10_000
    seed: int = 7
    duration_s: float = 3600.0
    start_unix_s: int = 1_767_225_600  # 2026-01-01T00:00:00Z
    fault_rate: float = 0.06
    # No structural fault in the first requests: every parent stage (checkout
    # serves a fifth of them) must see structural.norm_min_calls (200) calls
    # to learn its norm before a leak starts, as a deploy would start one.
    warmup_traces: int = 1000
    # Share of requests (after the warm-up, never with a structural fault) that
    # are an N+1 query pattern or 20x slower throughout: trace_outlier labels.
    outlier_rate: float = 0.0
    latency_faults: tuple["LatencyFault", ...] = ()
    error_faults: tuple["ErrorFault", ...] = ()
    # steady natural failures: product lookups time out now and then all day
    natural_errors: tuple["ErrorFault", ...] = (
        ErrorFault("catalog", "GET product:*", 0.0, float("inf"), 0.05, "TimeoutError", "timed out after 500 ms"),)
    faults: tuple[str, ...] = tuple(FAULTS)  # which structural faults to place
    # No faults in the last minutes: a late export there would arrive after the
    # last traffic, when event time no longer moves, so it is not late in replay.
    cooldown_s: float = 300.0
    max_skew_ms: float = 4.0
    # What real traffic has besides a log-normal body, drawn from a random
    # stream of its own (the requests, faults and labels stay as they are):
    # a heavy Pareto tail (alpha 1.5) on this share of single calls; stalls
    # of one service for a whole request in this share of requests; the share
    # of cart reads whose TTL refresh outlives the handler (routine, not a leak).
    tail_rate: float = 0.01
    stall_rate: float = 0.003
    routine_outlive_rate: float = 0.12
    # Pods per service (resource service.instance.id "<service>-<i>"): each call
    # into a service lands on one, drawn from a stream of its own.
    pods: int = 1


@dataclass(frozen=True)
class LatencyFault:
    """From ``start_s`` to ``end_s`` (seconds into the scenario) a leaf stage is
    ``factor`` times slower, or, with ``ramp``, creeps from 1x up to ``factor``."""

    service: str
    operation: str
    start_s: float
    end_s: float
    factor: float
    ramp: bool = False
    pod: int | None = None  # only this pod's calls (``ScenarioConfig.pods``), or all

    @property
    def name(self) -> str:
        return f"{'leak' if self.ramp else 'slowdown'}_{self.factor}x" + (f"_pod{self.pod}" if self.pod is not None
                                                                          else "")


@dataclass
class Label:
    kind: str
    fault: str
    trace_id: str | None
    span_id: str | None
    service: str | None = None
    operation: str | None = None
    onset: int | None = None
    end: int | None = None


def latency_scenario(traces_per_s: float = 2.0, hours: float = 4.0, seed: int = 7) -> ScenarioConfig:
    """Two stationary hours, then a 3x DB slowdown, a 1.5x one and a slow leak,
    with N+1 and 20x-slow requests sprinkled throughout; during the leak, the
    product cache lookup fails 30 % of its calls (a new exception) for 15 min."""
    hour = 3600.0
    return ScenarioConfig(
        traces=int(traces_per_s * hours * hour), seed=seed, duration_s=hours * hour, outlier_rate=0.01,
        latency_faults=(
            LatencyFault("catalog", "SELECT products", 2.0 * hour, 2.5 * hour, 3.0),
            LatencyFault("checkout", "INSERT orders", 2.75 * hour, 3.25 * hour, 1.5),
            LatencyFault("cart", "GET cart:*", 3.33 * hour, hours * hour - 300, 3.0, ramp=True),
        ),
        error_faults=(ErrorFault("catalog", "GET product:*", 3.45 * hour, 3.7 * hour, 0.3),),
    )


class _SeededIds(IdGenerator):
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1


@dataclass(order=True)
class _Pending:
    export_at: int
    seq: int
    service: str = field(compare=False)
    item: object = field(compare=False)


class _Outbox:
    """Holds exported spans/logs until their emulated batch export time."""

    def __init__(self) -> None:
        self.heap: list[_Pending] = []
        self.seq = 0
        self.delay: dict[int, int] = {}  # span id → extra export delay (late export)
        self.dropped: set[tuple[int, str]] = set()  # (trace id, service) whose spans the exporter drops
        self.dropped_count = 0

    def put(self, export_at: int, service: str, item: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, _Pending(export_at, self.seq, service, item))

    def take_until(self, horizon: int) -> Iterator[_Pending]:
        while self.heap and self.heap[0].export_at < horizon:
            yield heapq.heappop(self.heap)


def _batch_boundary(t: int, phase: int) -> int:
    return ((t - phase) // BATCH_PERIOD + 1) * BATCH_PERIOD + phase


class _SpanOutbox(SpanExporter):
    def __init__(self, outbox: _Outbox, service: str, phase: int) -> None:
        self._outbox, self._service, self._phase = outbox, service, phase

    def export(self, spans) -> SpanExportResult:
        for span in spans:
            ctx = span.context
            if (ctx.trace_id, self._service) in self._outbox.dropped:
                self._outbox.dropped_count += 1
                continue
            ended = span.end_time if span.end_time and span.end_time >= span.start_time else span.start_time
            export_at = _batch_boundary(ended, self._phase) + self._outbox.delay.pop(ctx.span_id, 0)
            self._outbox.put(export_at, self._service, span)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _LogOutbox(LogRecordExporter):
    def __init__(self, outbox: _Outbox, service: str, phase: int) -> None:
        self._outbox, self._service, self._phase = outbox, service, phase

    def export(self, batch) -> LogRecordExportResult:
        for record in batch:
            self._outbox.put(_batch_boundary(record.log_record.timestamp, self._phase), self._service, record)
        return LogRecordExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class _Service:
    """One emulated service: its tracer, its logger and its clock skew."""

    def __init__(self, name: str, rng: random.Random, spans: _Outbox, logs: _Outbox, max_skew_ms: float,
                 pods: int = 1) -> None:
        phase = rng.randrange(BATCH_PERIOD)
        self.name = name
        self.skew = int(rng.uniform(-max_skew_ms, max_skew_ms) * MS)
        self.pod = 0  # the pod serving the current call
        self.providers, self.tracers, self.log_providers, self.loggers = [], [], [], []
        ids = _SeededIds(rng)
        for pod in range(pods):
            resource = Resource.create({"service.name": name, "service.version": "1.4.2",
                                        "service.instance.id": f"{name}-{pod}"})
            provider = TracerProvider(resource=resource, id_generator=ids)
            provider.add_span_processor(SimpleSpanProcessor(_SpanOutbox(spans, name, phase)))
            self.providers.append(provider)
            self.tracers.append(provider.get_tracer("shop." + name))
            log_provider = LoggerProvider(resource=resource)
            log_provider.add_log_record_processor(SimpleLogRecordProcessor(_LogOutbox(logs, name, phase)))
            self.log_providers.append(log_provider)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                handler = LoggingHandler(logger_provider=log_provider)
            logger = logging.Logger("shop." + name)
            logger.propagate = False
            logger.addHandler(handler)
            self.loggers.append(logger)

    def shutdown(self) -> None:
        for provider in (*self.providers, *self.log_providers):
            provider.shutdown()

    def start(self, name, kind, parent, t, attributes=None, links=None):
        context = trace_api.set_span_in_context(parent) if parent is not None else Context()
        return self.tracers[self.pod].start_span(name, context=context, kind=kind, attributes=attributes,
                                                 links=links, start_time=t + self.skew)

    def end(self, span, t) -> None:
        span.end(end_time=t + self.skew)

    def exception(self, span, t, kind: str, message: str, frames: tuple[str, ...]) -> None:
        """An exception recorded on the span as the SDKs record one: an ``exception`` event."""
        stack = "\n".join(["Traceback (most recent call last):"] + [
            f'  File "shop/{self.name}/{frame}.py", line {10 + 7 * i}, in {frame}' for i, frame in enumerate(frames)
        ] + [f"{kind}: {message}"])
        span.add_event("exception", {"exception.type": kind, "exception.message": message,
                                     "exception.stacktrace": stack}, timestamp=t + self.skew)

    def log(self, span, t, level: int, message: str) -> None:
        """A log record at simulated time ``t`` inside ``span``, through the logging bridge."""
        logger = self.loggers[self.pod]
        record = logger.makeRecord(logger.name, level, f"shop/{self.name}.py", 0, message, None, None)
        record.created = (t + self.skew) / SECOND
        with trace_api.use_span(span, end_on_exit=False):
            logger.handle(record)


class Shop:
    """The emulated application; one method per operation, times in ns."""

    def __init__(self, config: ScenarioConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.spans = _Outbox()
        self.logs = _Outbox()
        self.svc = {name: _Service(name, self.rng, self.spans, self.logs, config.max_skew_ms, config.pods)
                    for name in SERVICES}
        self.pods = random.Random(config.seed ^ 0x9005)  # which pod serves a call: the other streams stay as they were
        self.labels: list[Label] = []
        self.fault: str | None = None
        self.outlier: str | None = None
        self.trace_factor = 1.0
        self.noise = random.Random(config.seed ^ 0x5EED)
        self.errors = random.Random(config.seed ^ 0xE770)  # error faults draw here: the other streams stay as they were
        self.failing = False  # a span of this request failed and the failure propagates up
        self.stalled: str | None = None  # the service stalling in this request
        self.counts: dict[str, int] = {}

    # -- building blocks -------------------------------------------------
    def dur(self, median_ms: float, sigma: float = 0.35) -> int:
        value = median_ms * MS * self.trace_factor * math.exp(self.rng.gauss(0.0, sigma))
        if self.noise.random() < self.config.tail_rate:
            value *= self.noise.paretovariate(1.5)
        return int(value)

    def net(self) -> int:
        return int(self.rng.uniform(0.3, 1.5) * MS * self.trace_factor)

    def slowdown(self, service: str, operation: str, t: int) -> float:
        """The latency faults' factor for this stage at time t."""
        offset = t / SECOND - self.config.start_unix_s
        factor = 1.0
        for fault in self.config.latency_faults:
            if fault.service == service and fault.operation == operation and fault.start_s <= offset < fault.end_s \
                    and fault.pod in (None, self.svc[service].pod):
                progress = (offset - fault.start_s) / (fault.end_s - fault.start_s) if fault.ramp else 1.0
                factor *= 1.0 + (fault.factor - 1.0) * progress
        return factor

    def failure(self, service: str, operation: str, t: int) -> ErrorFault | None:
        """The natural failure or injected error fault that makes this call fail, if one does."""
        offset = t / SECOND - self.config.start_unix_s
        for fault in (*self.config.natural_errors, *self.config.error_faults):
            if fault.service == service and fault.operation == operation and fault.start_s <= offset < fault.end_s \
                    and fault.pod in (None, self.svc[service].pod) and self.errors.random() < fault.rate:
                return fault
        return None

    def label(self, span, fault: str) -> None:
        """A per-trace label, with the service of the span the fault is in (whose
        sidecar alone sees it, in fragment mode)."""
        ctx = span.get_span_context()
        trace_id = f"{ctx.trace_id:032x}"
        kind = FAULTS.get(fault, "trace_outlier")
        service = span.resource.attributes.get("service.name")
        self.labels.append(Label(kind, fault, trace_id, f"{ctx.span_id:016x}" if kind != "trace_outlier" else None,
                                 service))
        if fault in ALSO_MISSING_EXPECTED:
            self.labels.append(Label("missing_expected_span", fault, trace_id, None, service))

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def leaf(self, service: str, parent, name: str, kind, t: int, median_ms: float, attributes=None,
             *, can_fail_end: bool = False) -> int:
        """A span without children; the late-export and invalid-end faults land on leaves."""
        svc = self.svc[service]
        span = svc.start(name, kind, parent, t, attributes)
        end = t + int(self.dur(median_ms) * self.slowdown(service, name, t))
        if service == self.stalled:
            end += int(self.noise.uniform(50, 200) * MS)
        if can_fail_end and self.fault == "invalid_end":
            self.fault = None
            self.label(span, "invalid_end")
            # end 0 or an end before the start: both are exported as-is by the SDK
            svc.end(span, -svc.skew if self.rng.random() < 0.5 else t - self.dur(2.0))
            return end
        if can_fail_end and self.fault == "late_export":
            self.fault = None
            self.label(span, "late_export")
            self.spans.delay[span.get_span_context().span_id] = self.rng.randrange(*LATE_EXPORT_DELAY)
        fault = self.failure(service, name, t)
        if fault is not None:
            message = fault.message.format(node=self.errors.randrange(2, 250))
            span.set_status(Status(StatusCode.ERROR, message))
            svc.exception(span, end, fault.exception, message, ("handle", "lookup", "execute_command"))
            self.failing = True
            if fault in self.config.error_faults:  # an exception the service never raised before: its line is new
                self.labels.append(Label("log_anomaly", fault.name, f"{span.get_span_context().trace_id:032x}", None))
            self.count(f"failed_{fault.exception}")
        svc.end(span, end)
        return end

    def db(self, service: str, parent, statement: str, system: str, t: int, median_ms: float) -> int:
        if self.fault == "skipped_call":  # a code path that forgot its call: no span at all
            self.fault = None
            self.label(parent, "skipped_call")
            self.labels[-1].span_id = None
            return t
        attributes = {"db.system": system, "db.namespace": "shop", "db.operation.name": statement.split()[0],
                      "db.query.text": QUERIES.get(statement, statement), "server.address": f"{system}.internal",
                      "server.port": 5432 if system == "postgresql" else 6379,
                      "network.peer.address": f"10.0.3.{self.rng.randrange(2, 250)}"}
        return self.leaf(service, parent, statement, SpanKind.CLIENT, t, median_ms, attributes, can_fail_end=True)

    def call(self, caller: str, callee: str, parent, name: str, t: int,
             handler: Callable[[object, int], int], attributes: dict, *, status: int = 200) -> int:
        """A CLIENT span in ``caller`` and the SERVER span of ``callee`` under it."""
        transport = {"server.port": 8080, "network.protocol.version": "2" if "rpc.system" in attributes else "1.1",
                     "network.peer.address": f"10.0.2.{self.rng.randrange(2, 250)}"}
        client = self.svc[caller].start(name, SpanKind.CLIENT, parent, t,
                                        {**attributes, **transport, "peer.service": callee})
        t_server = t + self.net()
        server_svc = self.svc[callee]
        self.land(server_svc)
        server = server_svc.start(name, SpanKind.SERVER, client, t_server,
                                  {**attributes, **transport, "client.address": f"10.0.1.{self.rng.randrange(2, 250)}"})
        if self.fault == "exporter_drop" and callee in ("catalog", "payment", "cart"):
            self.fault = None
            self.label(client, "exporter_drop")
            self.spans.dropped.add((client.get_span_context().trace_id, callee))
        server_svc.log(server, t_server + MS // 10, logging.INFO, f"handling {name}")
        t_end = handler(server, t_server + self.dur(0.2))
        if self.failing:
            status = 500
        if status >= 500:
            server_svc.log(server, t_end, logging.ERROR, f"{name} failed: upstream unavailable ({status})")
            if "rpc.system" in attributes:  # HTTP instrumentations record the code alone and leave the status UNSET
                server.set_status(Status(StatusCode.ERROR))
                client.set_status(Status(StatusCode.ERROR))
        if "http.request.method" in attributes:
            client.set_attribute("http.response.status_code", status)
            server.set_attribute("http.response.status_code", status)
        elif "rpc.system" in attributes:  # INTERNAL from a failing server
            client.set_attribute("rpc.grpc.status_code", 13 if status >= 500 else 0)
            server.set_attribute("rpc.grpc.status_code", 13 if status >= 500 else 0)
        server_svc.end(server, t_end)
        t_back = t_end + self.net()
        self.svc[caller].end(client, t_back)
        return t_back

    def internal(self, service: str, parent, name: str, t: int, body: Callable[[object, int], int]) -> int:
        """An INTERNAL span around ``body``; the never-ended-span fault lands here."""
        svc = self.svc[service]
        span = svc.start(name, SpanKind.INTERNAL, parent, t)
        t_end = body(span, t + self.dur(0.1)) + self.dur(0.1)
        if self.failing:
            span.set_status(Status(StatusCode.ERROR))
        if self.fault == "never_ended_span":
            self.fault = None
            self.label(span, "never_ended_span")
            return t_end  # never ended: never exported; its children are orphans
        svc.end(span, t_end)
        return t_end

    def background(self, service: str, parent, parent_end: int, name: str, t: int) -> None:
        """Work started by a handler that keeps its context after the handler returned."""
        svc = self.svc[service]
        span = svc.start(name, SpanKind.INTERNAL, parent, t)
        self.label(span, "background_work")
        svc.end(span, parent_end + int(self.rng.uniform(0.2, 5.0) * SECOND))

    # -- services ----------------------------------------------------------
    def cart_get(self, server, t: int) -> int:
        t = self.db("cart", server, "GET cart:*", "redis", t, 0.6)
        t_end = t + self.dur(0.2)
        if self.noise.random() < self.config.routine_outlive_rate:  # fire-and-forget TTL refresh
            cart = self.svc["cart"]
            refresh = cart.start("refresh cart ttl", SpanKind.INTERNAL, server, t)
            cart.end(refresh, t_end + int(self.noise.uniform(1, 80) * MS))
            self.count("decoy_routine_outlive")
        return t_end

    def catalog_get(self, server, t: int) -> int:
        def lookup(span, t: int) -> int:
            t = self.db("catalog", span, "GET product:*", "redis", t, 0.5)
            if self.outlier == "n_plus_one":  # one query per item instead of one for all
                for _ in range(self.rng.randrange(15, 40)):
                    t = self.db("catalog", span, "SELECT products", "postgresql", t, 4.0)
            elif self.rng.random() < 0.35:  # cache miss: optional branch
                t = self.db("catalog", span, "SELECT products", "postgresql", t, 4.0)
                t = self.db("catalog", span, "SET product:*", "redis", t, 0.4)
            return t

        return self.internal("catalog", server, "lookup product", t, lookup)

    def payment_charge(self, server, t: int) -> int:
        external = {"http.request.method": "POST", "server.address": "api.payments.example", "http.response.status_code": 200}
        t = self.leaf("payment", server, "POST /v1/charges", SpanKind.CLIENT, t, 40.0, external)
        self.svc["payment"].log(server, t, logging.INFO, "charge authorized")
        return t + self.dur(0.3)

    def checkout_post(self, server, t: int) -> int:
        checkout = self.svc["checkout"]

        def process(span, t: int) -> int:
            t = self.leaf("checkout", span, "validate order", SpanKind.INTERNAL, t, 0.8, can_fail_end=True)
            t = self.charge_with_retries(span, t)
            t = self.db("checkout", span, "INSERT orders", "postgresql", t, 3.0)
            producer = checkout.start("orders publish", SpanKind.PRODUCER, span, t,
                                      {"messaging.system": "kafka", "messaging.destination.name": "orders"})
            t_sent = t + self.dur(1.5)
            checkout.end(producer, t_sent)
            self.email_consume(producer, t_sent + int(self.rng.uniform(5, 500) * MS))
            return t_sent

        t_end = self.internal("checkout", server, "process order", t, process)
        checkout.log(server, t_end, logging.INFO, "order placed")
        t_done = t_end + self.dur(0.2)
        if self.fault == "background_work":
            self.fault = None
            self.background("checkout", server, t_done, "write audit record", t_end - MS)
        return t_done

    def charge_with_retries(self, parent, t: int) -> int:
        attributes = {"http.request.method": "POST", "server.address": "payment"}
        roll = self.rng.random()
        if self.fault != "exporter_drop" and roll < 0.05:  # connection refused: no server, error, no status code
            failed = self.svc["checkout"].start("POST /charge", SpanKind.CLIENT, parent, t,
                                                {**attributes, "peer.service": "payment"})
            failed.set_status(Status(StatusCode.ERROR, "connection refused"))
            t += self.dur(1.0)
            self.svc["checkout"].exception(failed, t, "ConnectionRefusedError", "[Errno 111] Connection refused",
                                           ("place_order", "charge", "post"))
            self.svc["checkout"].end(failed, t)
            self.svc["checkout"].log(parent, t, logging.WARNING, "payment unreachable, retrying")
            self.count("decoy_retry_connect_error")
        elif self.fault != "exporter_drop" and roll < 0.08:  # 503 from a payment instance, then a retry
            t = self.call("checkout", "payment", parent, "POST /charge", t,
                          lambda server, ts: ts + self.dur(2.0), attributes, status=503)
            self.count("decoy_retry_503")
        return self.call("checkout", "payment", parent, "POST /charge", t, self.payment_charge, attributes)

    def email_consume(self, producer, t: int) -> None:
        email = self.svc["email"]
        consumer = email.start("orders process", SpanKind.CONSUMER, producer, t,
                               {"messaging.system": "kafka", "messaging.destination.name": "orders"})
        smtp = {"server.address": "smtp.example", "rpc.system": "smtp"}
        t_end = self.leaf("email", consumer, "SMTP send", SpanKind.CLIENT, t + self.dur(0.5), 30.0, smtp)
        email.log(consumer, t_end, logging.INFO, "confirmation mail sent")
        email.end(consumer, t_end + self.dur(0.3))
        self.count("decoy_consumer_after_root")

    # -- root operations -----------------------------------------------------
    def land(self, service: _Service) -> None:
        """The pod that serves this call into ``service`` (and the spans it makes)."""
        if self.config.pods > 1:
            service.pod = self.pods.randrange(self.config.pods)

    def request(self, t0: int) -> None:
        frontend = self.svc["frontend"]
        self.land(frontend)
        self.failing = False
        roll = self.rng.random()
        if self.outlier == "n_plus_one":
            roll = 0.0  # the N+1 pattern lives on the product page
        if roll < 0.5:
            route, method = "/product/{id}", "GET"
        elif roll < 0.8:
            route, method = "/cart", "GET"
        else:
            route, method = "/checkout", "POST"
        root = frontend.start(f"{method} {route}", SpanKind.SERVER, None, t0, {
            "http.route": route, "http.request.method": method,
            "url.path": route.replace("{id}", str(self.rng.randrange(1, 10_000))), "url.scheme": "https",
            "server.address": "shop.example", "server.port": 443, "network.protocol.version": "1.1",
            "client.address": f"198.51.100.{self.rng.randrange(1, 255)}",
            "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        })
        frontend.log(root, t0 + MS // 5, logging.INFO, f"{method} {route}")
        if self.outlier is not None:
            self.label(root, self.outlier)
        t = t0 + self.dur(0.3)
        if route == "/product/{id}":
            t = self.call("frontend", "catalog", root, "catalog.Catalog/GetProduct", t, self.catalog_get,
                          {"rpc.system": "grpc", "rpc.method": "GetProduct", "server.address": "catalog"})
        elif route == "/cart":
            t = self.call("frontend", "cart", root, "GET /cart", t, self.cart_get,
                          {"http.request.method": "GET", "server.address": "cart"})
        else:
            t = self.call("frontend", "cart", root, "GET /cart", t, self.cart_get,
                          {"http.request.method": "GET", "server.address": "cart"})
            t = self.call("frontend", "checkout", root, "POST /checkout", t, self.checkout_post,
                          {"http.request.method": "POST", "server.address": "checkout"})
        if not self.failing:  # a failed request answers 500 without its page
            t = self.leaf("frontend", root, "render page", SpanKind.INTERNAL, t, 1.0, can_fail_end=True)
        t_done = t + self.dur(0.2)
        if self.fault == "background_work":
            self.fault = None
            self.background("frontend", root, t_done, "warm recommendations", t - MS)
        if self.fault == "never_ended_root":
            self.fault = None
            self.label(root, "never_ended_root")
            return
        if self.failing:
            root.set_status(Status(StatusCode.ERROR))
            frontend.log(root, t_done, logging.ERROR, f"{method} {route} answered 500")
        root.set_attribute("http.response.status_code", 500 if self.failing else 200)
        frontend.end(root, t_done)

    def _quiet(self, index: int, t: int) -> bool:
        config = self.config
        return index < config.warmup_traces or t >= (config.start_unix_s + config.duration_s - config.cooldown_s) * SECOND

    def pick_fault(self, index: int, t: int) -> str | None:
        if self._quiet(index, t) or self.rng.random() >= self.config.fault_rate:
            return None
        return self.rng.choice(self.config.faults)

    def pick_outlier(self, index: int, t: int) -> str | None:
        # Forests warm up on 500 normal traces of each request type: the first 3,000 requests.
        if index < max(FOREST_WARMUP_TRACES, self.config.warmup_traces):
            return None
        if not self.config.outlier_rate or self._quiet(index, t) or self.rng.random() >= self.config.outlier_rate:
            return None
        return self.rng.choice(OUTLIERS)


@dataclass
class Generated:
    traces: int
    spans: int
    logs: int
    labels: list[Label]
    counts: dict[str, int]
    seconds: float


def generate(config: ScenarioConfig, write_traces: Callable[[str, list], None],
             write_logs: Callable[[str, list], None]) -> Generated:
    """Runs the shop and hands batches to the writers in export order.

    A writer receives (service, items) per emulated export request.
    """
    started = time.perf_counter()
    shop = Shop(config)
    rng = shop.rng
    t = config.start_unix_s * SECOND
    rate = config.traces / config.duration_s
    spans = logs = 0

    def drain(horizon: int) -> None:
        nonlocal spans, logs
        spans += _write_batches(shop.spans.take_until(horizon), write_traces)
        logs += _write_batches(shop.logs.take_until(horizon), write_logs)

    for index in range(config.traces):
        t += int(rng.expovariate(rate) * SECOND)
        shop.fault = shop.pick_fault(index, t)
        shop.outlier = shop.pick_outlier(index, t) if shop.fault is None else None
        shop.trace_factor = 20.0 if shop.outlier == "slowdown_20x" else 1.0
        shop.stalled = shop.noise.choice(SERVICES) if shop.noise.random() < config.stall_rate else None
        shop.request(t)
        if shop.fault is not None:  # this request had no place for it (e.g. drop on a product page)
            shop.count(f"fault_not_placed_{shop.fault}")
            shop.fault = None
        if index % 200 == 0:
            drain(t - FLUSH_HORIZON)
    drain(1 << 63)
    for service in shop.svc.values():
        service.shutdown()
    shop.counts["exporter_dropped_spans"] = shop.spans.dropped_count
    for kind, faults in (("latency_regression", config.latency_faults), ("error_regression", config.error_faults)):
        for fault in faults:
            shop.labels.append(Label(kind, fault.name, None, None, fault.service, fault.operation,
                                     int((config.start_unix_s + fault.start_s) * SECOND),
                                     int((config.start_unix_s + fault.end_s) * SECOND)))
    return Generated(config.traces, spans, logs, shop.labels, shop.counts, time.perf_counter() - started)


def _write_batches(pending: Iterator[_Pending], write: Callable[[str, list], None]) -> int:
    written = 0
    group: list = []
    key = None
    for item in pending:
        item_key = (item.export_at, item.service)
        if group and (item_key != key or len(group) >= MAX_SPANS_PER_REQUEST):
            write(key[1], group)
            written += len(group)
            group = []
        key = item_key
        group.append(item.item)
    if group:
        write(key[1], group)
        written += len(group)
    return written


# -- encodings -----------------------------------------------------------------
def _hex_ids(node, keys=("traceId", "spanId", "parentSpanId")) -> None:
    import base64

    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value, keys)
    elif isinstance(node, list):
        for value in node:
            _hex_ids(value, keys)


def otlp_json(message) -> str:
    """One OTLP/JSON line as the Collector's file exporter writes it."""
    document = MessageToDict(message, use_integers_for_enums=True)
    _hex_ids(document)
    return json.dumps(document, separators=(",", ":"))


def length_prefixed(message) -> bytes:
    body = message.SerializeToString()
    return struct.pack(">I", len(body)) + body


def write_scenario(out_dir: Path, config: ScenarioConfig, *, proto: bool = False) -> Generated:
    """Writes traces, logs (OTLP/JSON lines, or length-prefixed protobuf) and labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "pb" if proto else "jsonl"
    with open(out_dir / f"traces.{suffix}", "wb") as traces, open(out_dir / f"logs.{suffix}", "wb") as logs:
        if proto:
            result = generate(config, lambda _, spans: traces.write(length_prefixed(encode_spans(spans))),
                              lambda _, records: logs.write(length_prefixed(encode_logs(records))))
        else:
            result = generate(config, lambda _, spans: traces.write(otlp_json(encode_spans(spans)).encode() + b"\n"),
                              lambda _, records: logs.write(otlp_json(encode_logs(records)).encode() + b"\n"))
    with open(out_dir / "labels.jsonl", "w") as labels:
        for label in result.labels:
            labels.write(json.dumps({k: v for k, v in label.__dict__.items() if v is not None or k in ("trace_id", "span_id")}) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--traces", type=int, default=ScenarioConfig.traces)
    parser.add_argument("--seed", type=int, default=ScenarioConfig.seed)
    parser.add_argument("--duration", type=float, default=ScenarioConfig.duration_s, help="seconds of event time")
    parser.add_argument("--fault-rate", type=float, default=ScenarioConfig.fault_rate)
    parser.add_argument("--proto", action="store_true", help="length-prefixed protobuf instead of JSON lines")
    parser.add_argument("--latency", action="store_true",
                        help="the latency scenario: 4 h at 2 requests/s with latency faults and outliers "
                             "(--traces, --duration are ignored)")
    args = parser.parse_args()
    if args.latency:
        config = latency_scenario(seed=args.seed)
    else:
        config = ScenarioConfig(traces=args.traces, seed=args.seed, duration_s=args.duration, fault_rate=args.fault_rate)
    result = write_scenario(args.out, config, proto=args.proto)
    by_kind: dict[str, int] = {}
    for label in result.labels:
        by_kind[label.kind] = by_kind.get(label.kind, 0) + 1
    print(json.dumps({"out": str(args.out), "traces": result.traces, "spans": result.spans, "logs": result.logs,
                      "labels": by_kind, "counts": result.counts, "seconds": round(result.seconds, 2)}))


if __name__ == "__main__":
    main()
