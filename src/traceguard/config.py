"""Every setting, default and bound of traceguard, declared and validated here.

No other module holds a default: stages receive their section of
``PipelineConfig``. Durations accept ``"250ms"``, ``"30s"``, ``"5m"``,
``"1h"`` or a number of seconds, and are held as integer nanoseconds.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, field_validator, model_validator

from traceguard.auth import check_token

_UNITS_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> int:
    """Duration text or seconds → integer nanoseconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, e.g. '30s', '250ms', '5m'")
    if isinstance(value, (int, float)):
        return int(value * 1_000_000_000)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration, e.g. '30s', '250ms', '5m'")
    number, unit = match.groups()
    return int(float(number) * _UNITS_NS[unit or "s"])


# Dumped as "<n>ns": a bare number reads as seconds, so a dumped setting must say its unit to read back the same.
DurationNs = Annotated[int, BeforeValidator(parse_duration), PlainSerializer(lambda ns: f"{ns}ns"), Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecodeConfig(_Section):
    max_attribute_length: int = Field(256, ge=8, description="Kept attribute values are cut to this many characters.")
    max_name_length: int = Field(256, ge=8, description="Span names and service names are cut to this length.")
    max_log_body_length: int = Field(2048, ge=16, description="Log bodies are cut to this length.")
    max_stages: int = Field(50_000, ge=1, description="Stages whose kept attributes are remembered.")
    max_json_depth: int = Field(
        64, ge=8, le=10_000,
        description="Deepest JSON nesting a Jaeger or Zipkin file may have (OTLP and Jaeger need about 12); "
                    "deeper is corrupt. A streaming parser's cost grows with the square of the depth.")
    reorder_rows: int = Field(
        100_000, ge=1,
        description="Jaeger and Zipkin files carry no export order: their spans and span logs are replayed in "
                    "end-time order through a buffer of this many rows (about 300 bytes each).",
    )


class AssemblerConfig(_Section):
    decision_wait: DurationNs = Field(parse_duration("30s"), description="Quiet time after the last span of a rooted trace before it is decided.")
    max_trace_age: DurationNs = Field(parse_duration("5m"), description="A trace older than this is decided whatever its state.")
    allowed_lateness: DurationNs = Field(parse_duration("5s"), description="Event-time out-of-orderness tolerated by the replay watermark.")
    max_ahead: DurationNs = Field(
        parse_duration("1h"),
        description="Event time: a span ending further than this past the newest time seen does not move the "
                    "watermark alone (a clock years off, a forged timestamp); spans of 3 traces that far ahead, with "
                    "nothing in between, do (a gap in the input). 0: no limit.")
    max_spans_in_flight: int = Field(1_000_000, ge=1)
    max_traces_in_flight: int = Field(100_000, ge=1)
    decided_memory: int = Field(200_000, ge=0, description="How many decided trace ids are remembered for late-span detection.")
    decided_ttl: DurationNs = Field(parse_duration("1h"))

    @model_validator(mode="after")
    def _age_covers_wait(self) -> "AssemblerConfig":
        if self.max_trace_age < self.decision_wait:
            raise ValueError("max_trace_age must be at least decision_wait")
        return self


class StructuralConfig(_Section):
    clock_skew_tolerance: DurationNs = Field(
        parse_duration("20ms"),
        description="How far a child in another service may end after its parent before it counts as outliving it.",
    )
    min_overrun: DurationNs = Field(parse_duration("1ms"), description="The same, for a child in the parent's own service.")
    norm_min_calls: int = Field(
        200, ge=0,
        description="Calls of a stage before its routine rates (children outliving it, calls it makes) are "
                    "trusted; single occurrences on a stage not yet judged are held until then. 0: no norms, every stage is clean.",
    )
    norm_routine_rate: float = Field(
        1e-3, gt=0, le=1,
        description="Share of a stage's calls at or above which a child outliving it is the stage's norm "
                    "(reported once as a pattern, not per trace).",
    )
    norm_window: DurationNs = Field(parse_duration("30s"), description="Window whose rates are compared with the learned norm.")
    norm_persist_windows: int = Field(2, ge=1, description="Changed windows in a row before a rate change opens (calm ones before it resolves).")
    norm_half_life: DurationNs = Field(parse_duration("24h"), description="Weight of old calls in a norm halves over this much event time.")
    norm_z: float = Field(5.0, gt=0, description="Binomial standard errors a window's rate must move.")
    norm_min_ratio: float = Field(2.0, gt=1, description="Factor a window's rate must move by (up for a bad behaviour, down for a call).")
    norm_min_window_calls: int = Field(20, ge=1, description="Calls a window needs to be judged.")
    norm_max_stages: int = Field(50_000, ge=1, description="Stages (and parent→child call pairs) whose norms are kept.")
    unpaired_min_samples: int = Field(
        20, ge=1, description="Calls of a client stage seen before its missing server span is reported."
    )
    unpaired_min_ratio: float = Field(
        0.9, gt=0, le=1, description="Share of a client stage's calls that must have had a server span."
    )
    unpaired_window: int = Field(10_000, ge=10, description="Pairing counts are halved past this many calls, so they follow change.")
    unpaired_max_stages: int = Field(50_000, ge=1, description="Client stages whose pairing history is kept.")


class ErrorsConfig(_Section):
    """Each stage's own failure rate (``error_regression``)."""

    window: DurationNs = Field(parse_duration("30s"), description="Window whose failure rates are compared with the learned norm.")
    persist_windows: int = Field(2, ge=1, description="Windows with a rise in a row before it opens (calm ones before it resolves).")
    half_life: DurationNs = Field(parse_duration("24h"), description="Weight of old calls in a norm halves over this much event time.")
    z: float = Field(5.0, gt=0, description="Binomial standard errors a window's failure rate must rise.")
    min_ratio: float = Field(2.0, gt=1, description="Factor a window's failure rate must rise by.")
    min_calls: int = Field(200, ge=1, description="Calls of a stage before its failure rate is trusted.")
    min_window_calls: int = Field(20, ge=1, description="Calls a window needs to be judged.")
    max_stages: int = Field(50_000, ge=1, description="Stages whose failure rates are kept.")


class LatencyConfig(_Section):
    window: DurationNs = Field(parse_duration("30s"), description="Event-time window whose stage latencies are compared with the baseline (a regression opens after persist_windows of them).")
    min_window_samples: int = Field(8, ge=1, description="Samples a window needs to be judged.")
    max_window_samples: int = Field(4096, ge=16, description="Samples kept per stage and window (a reservoir beyond).")
    warmup_samples: int = Field(200, ge=10, description="Baseline samples before a stage is judged at all.")
    regression_min_ratio: float = Field(1.2, gt=1, description="Smallest median shift (current/baseline) that counts.")
    regression_z: float = Field(4.0, gt=0, description="How many standard errors the pooled median of a run must move (and the chance level, as a normal tail, of its count of samples above the baseline median × regression_min_ratio).")
    persist_windows: int = Field(2, ge=1, description="Consecutive shifted windows before a regression opens (and calm ones before it closes).")
    baseline_half_life: DurationNs = Field(parse_duration("24h"), description="Weight of old baseline samples halves over this much event time.")
    slow_stage_z: float = Field(8.0, gt=0, description="Robust z (log space) of one span's self time beyond which it is a slow_stage.")
    slow_stage_min_excess: DurationNs = Field(
        parse_duration("10ms"),
        description="A slow_stage must also exceed the baseline p99 by this much: a few ms on a sub-ms stage is "
                    "within clock skew and scheduling noise, and nobody acts on it.",
    )
    slow_stage_min_samples: int = Field(
        5000, ge=10,
        description="Baseline samples before slow_stage reports a stage's spans: its tail must be measured (a "
                    "once-in-10^4 stall seen), not guessed; trace_outlier's stage and duration bars wait as long.",
    )
    slow_stage_max_per_trace: int = Field(3, ge=1)
    max_stages: int = Field(20_000, ge=1, description="Stages with a baseline; further stages are not tracked and are counted.")
    per_pod: bool = Field(
        True,
        description="Also keep a baseline per pod (k8s.pod.name, else service.instance.id) of each stage that more "
                    "than one pod serves, and report one pod that turns slower while its peers do not: one slow pod "
                    "of three moves its stage's median too little for the stage's own test. Up to max_stages "
                    "(stage, pod) pairs.",
    )


class StructureConfig(_Section):
    min_traces: int = Field(100, ge=1, description="Normal traces of a root operation before absences are judged.")
    min_presence: float = Field(0.98, gt=0, le=1, description="Share of normal traces a stage must appear in to be expected.")
    max_root_operations: int = Field(10_000, ge=1)
    max_stages_per_root: int = Field(1_000, ge=1)


class ForestConfig(_Section):
    warmup_traces: int = Field(500, ge=50, description="Normal traces of a root operation before its forest is fitted.")
    reservoir: int = Field(2_000, ge=50, description="Recent normal traces a forest is (re)fitted on.")
    refit_every: int = Field(5_000, ge=100, description="Traces between refits.")
    batch: int = Field(256, ge=1, description="Traces scored together (vectorised).")
    max_delay: DurationNs = Field(parse_duration("10s"), description="A trace waits at most this long (pipeline clock) for its batch.")
    n_estimators: int = Field(100, ge=10)
    top_stages: int = Field(6, ge=0, description="Stages whose self time is a feature, chosen by share of self time at fit.")
    score_quantile: float = Field(0.02, ge=0, lt=1, description="A trace must score below this quantile of the training scores.")
    min_feature_z: float = Field(6.0, ge=0, description="An outlier must also deviate this much (robust z) in at least one feature.")
    extreme_feature_z: float = Field(
        12.0, ge=0,
        description="A deviation this large (robust z) is an outlier whatever the forest says: trees cannot split beyond the training range.",
    )
    max_root_operations: int = Field(1_000, ge=1, description="Root operations with their own forest; the rest share one.")
    seed: int = 0


class TemplatesConfig(_Section):
    """Log templates per service (``log_anomaly``)."""

    enabled: bool = Field(True, description="Mine log templates and report log_anomaly.")
    window: DurationNs = Field(parse_duration("30s"), description="Window whose lines join the template baselines (bursts held out).")
    half_life: DurationNs = Field(parse_duration("24h"), description="Weight of old lines in a template's share halves over this much event time.")
    accept_after: DurationNs = Field(
        parse_duration("30m"), description="A template raised above its share this long is the new normal.")
    min_lines: int = Field(2_000, ge=1, description="Baseline lines of a service before its lines are judged.")
    jump_windows: int = Field(
        2, ge=1, description="Windows in a row a known template must be far above its share of its service's lines "
                             "before its rate jump opens a stage-level log_anomaly (an incident).")
    max_templates: int = Field(1_000, ge=10, description="Templates kept per service (least recently seen go first).")
    max_services: int = Field(1_000, ge=1, description="Services whose templates are mined.")
    max_line: int = Field(300, ge=16, description="Characters of a line's first line that are mined.")


class LearnedConfig(_Section):
    enabled: bool = True
    alert_rate: float = Field(
        1e-4, gt=0, lt=1,
        description="False-alarm budget: on stationary traffic the learned per-trace kinds flag at most this share "
                    "of traces; their thresholds are set from each stage's own tail to meet it.",
    )
    latency: LatencyConfig = LatencyConfig()
    structure: StructureConfig = StructureConfig()
    forest: ForestConfig = ForestConfig()
    templates: TemplatesConfig = TemplatesConfig()


class IncidentConfig(_Section):
    """How findings are grouped into incidents (``correlate.incidents``)."""

    burst: int = Field(3, ge=2, description="Per-trace findings blaming one stage within burst_window that open an incident.")
    burst_window: DurationNs = Field(parse_duration("60s"), description="Window of a burst of slow spans or outliers.")
    burst_by_chance: DurationNs = Field(
        parse_duration("30d"), gt=0,
        description="A burst opens an incident only if the stage's own rate of such findings so far would bring "
                    "one by chance less often than once in this long (routine slow requests come together by chance).",
    )
    outlived_burst_window: DurationNs = Field(
        parse_duration("10s"),
        description="Window of a burst of outlived contexts on one clean stage: each is a finding of its own, so "
                    "only a dense burst (a callee past its callers' deadlines) is one incident.",
    )
    quiet: DurationNs = Field(
        parse_duration("2m"),
        description="An incident whose stage-level changes all resolved closes after this long with no finding.",
    )
    exemplar_findings: int = Field(
        3, ge=0, description="Per-trace findings of an incident that still go to the sinks; the rest are counted on it.",
    )
    update_interval: DurationNs = Field(parse_duration("60s"), description="How often an open incident's counts are written again.")
    max_open: int = Field(1_000, ge=1, description="Open incidents; changes beyond stay plain findings.")
    max_affected: int = Field(20, ge=1, description="Affected caller stages listed per incident.")
    pod_min_calls: int = Field(
        20, ge=1, description="Calls of a culprit stage a pod needs while the incident is open before it is compared "
                              "with the service's other pods.",
    )
    pod_ratio: float = Field(
        2.0, gt=1.0, description="A culprit names a pod when that pod's median time (its failure rate, for errors) is "
                                 "this many times every other pod's: the fault is the pod's, not the service's.",
    )


class LogConfig(_Section):
    max_records: int = Field(200_000, ge=0, description="Log records held in the index, all traces together.")
    max_per_trace: int = Field(200, ge=1)
    ttl: DurationNs = Field(parse_duration("15m"))
    max_linked: int = Field(20, ge=0, description="Log records attached to one finding.")


class StoreConfig(_Section):
    """The findings store of ``serve`` and ``consume`` (``state_dir/anomalies.sqlite``): its retention."""

    max_age: DurationNs = Field(
        parse_duration("7d"), ge=parse_duration("1m"),
        description="Findings detected longer ago than this, and incidents resolved longer ago, are deleted "
                    "(pipeline time: event time for consume --time event).")
    max_bytes: int = Field(
        512 << 20, ge=1 << 20,
        description="Bound on the data in the store file; past it the oldest findings are deleted until it is "
                    "under 90 % of it (the file keeps its size and reuses the freed pages).")
    prune_interval: DurationNs = Field(parse_duration("1m"), ge=parse_duration("1s"),
                                       description="How often retention runs.")
    trace_spans: int = Field(2000, ge=1, le=100_000,
                             description="Spans (and log records) kept of each trace with findings, for the web "
                                         "view's trace page.")


class ServeConfig(_Section):
    """The live sidecar (``traceguard serve``): listeners, store, limits."""

    grpc_listen: str = Field("127.0.0.1:4317", description="OTLP/gRPC address (localhost by default, as the Collector).")
    http_listen: str = Field("127.0.0.1:4318", description="OTLP/HTTP address.")
    api_listen: str = Field("127.0.0.1:8080", description="HTTP API, health and /metrics address.")
    state_dir: Path = Field(Path(".traceguard"), description="SQLite store and model snapshots.")
    scope: Literal["trace", "local"] = Field(
        "trace", description="trace: judge whole traces (every service's spans come here). local: a sidecar that "
                             "gets only its own pod's spans judges each trace's local fragment; its entry spans "
                             "(SERVER and CONSUMER spans whose parent is not here) are its roots, and no finding "
                             "blames another pod's span (see the README, Fragment mode).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1,
                                   description="Largest export request, compressed or not (gRPC caps messages at 2 GiB).")
    retry_after: DurationNs = Field(parse_duration("1s"), description="Back-off suggested to clients at the bounds.")
    max_connections: int = Field(
        1024, ge=1, le=60_000,
        description="Open connections per HTTP listener (OTLP/HTTP, API; consume's API too); past it new ones are "
                    "closed at once and counted (traceguard_connections_refused_total).")
    read_timeout: DurationNs = Field(
        parse_duration("30s"), ge=parse_duration("100ms"),
        description="An HTTP request must arrive whole within this: its headers after the connection opens (or "
                    "the previous response ends), its body after its headers. Slower ones are closed and counted.")
    max_receiving_bytes: int = Field(
        256 << 20, ge=1 << 20,
        description="Request bytes the OTLP/HTTP receiver holds while bodies arrive, all requests together; past "
                    "it a request is answered 503 with Retry-After (stalled uploads cannot take the memory).")
    tick: DurationNs = Field(parse_duration("200ms"), ge=parse_duration("1ms"),
                             description="How often due traces are decided (at least 1ms: 0 would spin).")
    decisions_per_lock: int = Field(200, ge=1, description="Traces decided before the receivers get the pipeline again.")
    snapshot_interval: DurationNs = Field(parse_duration("5m"), description="How often learned state is saved.")
    shutdown_timeout: DurationNs = Field(parse_duration("10s"), description="Bound on the graceful stop.")
    wal: bool = Field(
        True, description="Keep a write-ahead log of accepted requests in state_dir/wal, replayed on start: a crash "
                          "or kill -9 loses no acknowledged span.")
    wal_fsync: bool = Field(
        False, description="Answer an export only once its record is fsynced (one fsync shared by the requests "
                           "waiting together), so a power loss loses nothing either. Off (the Collector's "
                           "file_storage default), a record is written before the answer and survives a killed "
                           "process, not a power loss.")
    wal_max_bytes: int = Field(
        1 << 30, ge=1 << 20,
        description="Bound on the write-ahead log; at it exports are refused (retry later) until decisions trim it.")
    wal_segment_bytes: int = Field(16 << 20, ge=1 << 16, description="Write-ahead log segment size (trimmed whole).")
    wal_commit_interval: DurationNs = Field(
        parse_duration("1s"), ge=parse_duration("10ms"),
        description="How often the write-ahead log is trimmed up to the oldest undecided request.")
    jsonl_out: Path | None = Field(None, description="Also append findings as JSONL here.")
    model_dir: Path | None = Field(None, description="Trained models to start from when the state dir has none yet.")
    token: str | None = Field(
        None, description="Bearer token the OTLP receivers and the API require when set (not /healthz, /readyz); "
                          "an empty one is an error.")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve OTLP and the API over TLS (with tls_key).")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    forward_to: str | None = Field(None, description="Upstream OTLP/gRPC HOST:PORT that gets every accepted request.")
    forward_queue: int = Field(1000, ge=1, description="Requests waiting to be forwarded; the oldest are dropped past it.")

    @model_validator(mode="after")
    def _addresses(self) -> "ServeConfig":
        for key in ("grpc_listen", "http_listen", "api_listen"):
            host, _, port = getattr(self, key).rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"{key} must be HOST:PORT, got {getattr(self, key)!r}")
        _check_listener_security(self.token, self.tls_cert, self.tls_key)
        return self


def _check_listener_security(token: str | None, tls_cert: Path | None, tls_key: Path | None) -> None:
    try:
        check_token(token)
    except ValueError as exc:
        raise ValueError(f"token {exc}") from None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")


class ConsumeConfig(_Section):
    """The Kafka stream processor (``traceguard consume``); names and formats as the Collector's kafka exporter.
    Also the broker, group and judge settings of ``serve`` instances that share one judge (``decided_topic``)."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated HOST:PORT list of Kafka brokers.")
    group: str = Field("traceguard", min_length=1, description="Consumer group: consumers in one group split the partitions.")
    traces_topic: str = Field("otlp_spans", min_length=1)
    logs_topic: str | None = Field("otlp_logs", description="Empty: read no logs.")
    encoding: Literal["otlp_proto", "otlp_json"] = Field("otlp_proto", description="Message encoding, as the exporter's `encoding`.")
    initial_offset: Literal["earliest", "latest"] = Field(
        "latest", description="Where a group without committed offsets starts (the Collector's kafka receiver default)."
    )
    time: Literal["wall", "event"] = Field(
        "wall", description="wall: live decisions; event: the replay watermark, for backfills (deterministic)."
    )
    anomalies_topic: str | None = Field("traceguard_anomalies", description="Findings as JSON, keyed by trace id or stage; empty: none.")
    dead_letter_topic: str | None = Field(None, description="Undecodable records are copied here (with their origin in headers).")
    state_dir: Path | None = Field(None, description="SQLite store, model snapshots and the detectors' checkpoint.")
    out: Path | None = Field(None, description="Also append findings as JSONL here.")
    api_listen: str | None = Field(None, description="Serve the HTTP API and /metrics here (HOST:PORT).")
    token: str | None = Field(None, description="Bearer token the API requires when set (not /healthz, /readyz); an empty one is an error.")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve the API over TLS (with tls_key).")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    exit_at_end: bool = Field(False, description="Stop once caught up with the end offsets seen at start and all is decided.")
    commit_interval: DurationNs = Field(parse_duration("5s"), description="How often decided offsets are committed.")
    late_horizon: DurationNs = Field(
        parse_duration("5m"),
        description="Records read this recently stay uncommitted (pipeline clock), so after a crash or a rebalance "
                    "a span up to this much later than its trace's decision is still known as late.",
    )
    commit_metadata_bytes: int = Field(
        4000, ge=0,
        description="Room for the decided traces that straddle a commit point in the commit's metadata "
                    "(the broker's offset.metadata.max.bytes, 4096 by default, must allow it).",
    )
    poll_timeout: DurationNs = Field(parse_duration("200ms"))
    max_poll_records: int = Field(500, ge=1)
    max_buffered_records: int = Field(200, ge=1, description="Fetched records held per partition (event-time merge); the partition is paused beyond.")
    max_partition_fetch_bytes: int = Field(1 << 20, ge=1024)
    fetch_max_bytes: int = Field(16 << 20, ge=1024)
    session_timeout: DurationNs = Field(parse_duration("10s"))
    heartbeat_interval: DurationNs = Field(parse_duration("3s"))
    pause_at: float = Field(0.95, gt=0, le=1, description="Share of max_spans_in_flight in use at which partitions pause (wall time).")
    resume_at: float = Field(0.8, gt=0, le=1, description="...and at or below which they resume.")
    snapshot_interval: DurationNs = Field(parse_duration("5m"), description="How often learned models are saved to state_dir.")
    decided_topic: str | None = Field(
        None, description="One judge for the group: members only assemble and send each decided trace here "
                          "(one partition; made with a compacted `<topic>_state` beside it if missing); the member "
                          "that holds it runs every detector on the whole traffic and writes all findings and "
                          "incidents, its state snapshotted to `<topic>_state` every snapshot_interval for the next "
                          "holder. Empty: each member detects on its own share. Also for `serve` instances behind "
                          "the Collector's load-balancing exporter: with it set they are such a group (bootstrap_servers "
                          "and group name it).")
    judge_max_waiting: int = Field(
        50_000, ge=1,
        description="With decided_topic: decided traces the judge holds until every partition's watermark has passed "
                    "them; past it the oldest are judged early (counted), so a member far behind bounds memory, "
                    "not the order.")
    judge_delay: DurationNs = Field(
        parse_duration("2s"), gt=0,
        description="`serve` with decided_topic: the judge takes a trace once its wall clock is this far past the "
                    "trace's decision (the members decide on the wall clock they share, so they send no watermarks); "
                    "it covers the way through the broker and the hosts' clock skew. A trace that comes later is "
                    "judged at once and counted as out of order.")
    watermark_step: DurationNs = Field(
        parse_duration("1s"), gt=0,
        description="With decided_topic: how far a member's clock moves between the watermarks it sends the judge, "
                    "which judges traces only up to the watermark every partition has passed.")

    @model_validator(mode="after")
    def _check(self) -> "ConsumeConfig":
        if self.resume_at > self.pause_at:
            raise ValueError("resume_at must not exceed pause_at")
        if self.heartbeat_interval >= self.session_timeout:
            raise ValueError("heartbeat_interval must be below session_timeout")
        if self.api_listen is not None:
            host, _, port = self.api_listen.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"api_listen must be HOST:PORT, got {self.api_listen!r}")
        _check_listener_security(self.token, self.tls_cert, self.tls_key)
        return self


class UiConfig(_Section):
    """The web view at ``/`` on the API port of ``serve`` and ``consume``, and the replay report."""

    trace_link: str | None = Field(
        None, description="A trace in your tracing UI, with {trace_id} where its id goes (Jaeger: "
                          "https://jaeger.example/trace/{trace_id}; Tempo in Grafana: an Explore URL): each trace "
                          "page links there.")
    series_windows: int = Field(240, ge=2, le=100_000,
                                description="Windows of each stage's latency and error series kept for its page.")
    series_stages: int = Field(2000, ge=1, le=1_000_000,
                               description="Stages whose series are kept (the first seen; the rest are counted).")
    refresh: DurationNs = Field(parse_duration("5s"), ge=parse_duration("1s"),
                                description="How often an open page of the web view fetches what changed.")

    @field_validator("trace_link")
    @classmethod
    def _has_trace_id(cls, value: str | None) -> str | None:
        if value is not None and "{trace_id}" not in value:
            raise ValueError("must contain {trace_id}, where the trace's id goes")
        if value is not None and not value.startswith(("http://", "https://", "/")):
            raise ValueError("must be an http(s) URL or a path")
        return value


class PipelineConfig(_Section):
    decode: DecodeConfig = DecodeConfig()
    assembler: AssemblerConfig = AssemblerConfig()
    structural: StructuralConfig = StructuralConfig()
    errors: ErrorsConfig = ErrorsConfig()
    learned: LearnedConfig = LearnedConfig()
    incidents: IncidentConfig = IncidentConfig()
    logs: LogConfig = LogConfig()
    store: StoreConfig = StoreConfig()
    ui: UiConfig = UiConfig()
    serve: ServeConfig = ServeConfig()
    consume: ConsumeConfig = ConsumeConfig()


class ConfigError(ValueError):
    """A setting is invalid; the message names the key."""


ENV_PREFIX = "TRACEGUARD_"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None,
                warn: Callable[[str], None] = logging.getLogger(__name__).warning) -> PipelineConfig:
    """Builds the config: defaults, then the file, then environment variables,
    then flags (each overrides the ones before).

    Args:
        path: a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file whose tables are the sections.
        overrides: flags, ``{"assembler.decision_wait": "10s"}``; ``None`` values are skipped.
        environ: ``TRACEGUARD_SERVE__GRPC_LISTEN=0.0.0.0:4317`` is ``serve.grpc_listen``
            (``__`` separates sections); ``os.environ`` if not given. A ``TRACEGUARD_``
            variable that names no setting (Kubernetes makes ``TRACEGUARD_PORT`` for a
            Service named traceguard) is ignored, and ``warn`` names it.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(path)
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}  # dotted key -> where its value came from, for the error message
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        if not _is_setting(dotted):
            warn(f"ignoring environment variable {name}: it names no setting")
            continue
        _put(data, dotted, value)
        sources[dotted] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _put(data, dotted, value)
            sources[dotted] = f"--{dotted.split('.')[-1].replace('_', '-')}"
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            source = next((f" (from {where})" for key, where in sources.items() if dotted.startswith(key)), "")
            problems.append(f"{dotted}{source}: {err['msg']}")
        raise ConfigError(f"invalid configuration: {'; '.join(problems)}") from None


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = value


def _is_setting(dotted: str) -> bool:
    model: Any = PipelineConfig
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return getattr(model, "model_fields", None) is None  # a leaf, not a whole section


def _read_file(path: Path) -> dict[str, Any]:
    import json
    import tomllib

    import yaml

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a table of sections")
    return data


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
