"""Command line: ``traceguard replay``, ``train``, ``serve`` and ``consume``."""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import os
import signal
import sys
import textwrap
from pathlib import Path

from traceguard import __version__
from traceguard.config import ConfigError, load_config
from traceguard.detect.base import times
from traceguard.models import store
from traceguard.models.store import ModelFileError
from traceguard.replay import ReplayAborted, run_replay
from traceguard.runtime import tune_gc
from traceguard.sources.replay import FORMATS, WrongFormat
from traceguard.sinks import JsonlSink


_DESCRIPTION = ("traceguard: finds what went wrong in OpenTelemetry traces (missing spans, unfinished contexts, "
                "latency and error regressions, rare log lines), grouped into incidents with their logs.")
_EPILOG = """\
examples:
  traceguard replay traces.jsonl.gz --logs logs.jsonl --out findings.jsonl --report report.html
  traceguard train good-day.jsonl --model-dir models/ && traceguard replay today.jsonl --model-dir models/
  traceguard serve --state-dir /var/lib/traceguard --forward-to otel-collector:4317
  traceguard consume --bootstrap-servers kafka:9092 --group traceguard --state-dir state/

exit codes:
  0  done (replay, train), stopped by SIGTERM/SIGINT (serve, consume), or caught up (consume --exit-at-end)
  1  consume: findings could not be written to a sink (nothing past them is committed)
  2  usage, configuration or input error: a bad flag or setting, a missing or unreadable file, an input
     of which no span could be read, an unwritable --out, an unusable model directory or store

environment:
  Every setting can be given as TRACEGUARD_<SECTION>__<KEY>, e.g. TRACEGUARD_SERVE__TOKEN=...,
  TRACEGUARD_ASSEMBLER__DECISION_WAIT=10s. Precedence: flags > environment > --config file > defaults.
  Other TRACEGUARD_* variables (Kubernetes service links) are ignored with a warning naming them.
"""
_CONFIG_HELP = "TOML, YAML or JSON file with the settings (see the README); flags and the environment override it"


def _command(commands, name: str, summary: str, description: str, examples: str):
    return commands.add_parser(name, help=summary, description=textwrap.fill(f"{summary}. {description}", 79),
                               epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter)


def _timing_flags(command, lateness: bool) -> None:
    command.add_argument("--config", type=Path, help=_CONFIG_HELP)
    command.add_argument("--decision-wait", help="quiet time before a rooted trace is decided (default 30s)")
    command.add_argument("--max-trace-age", help="age at which any trace is decided (default 5m)")
    if lateness:
        command.add_argument("--allowed-lateness", help="event-time out-of-orderness tolerated (default 5s)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traceguard", description=textwrap.fill(_DESCRIPTION, 79), epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"traceguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = _command(
        commands, "replay", "detect anomalies in exported trace files",
        "Traces are reassembled in event time (a watermark over span end times), so a day of traffic is judged in "
        "minutes and the same input always gives the same findings. Findings go to stdout (or --out) as JSONL, "
        "a summary to stderr.",
        "  traceguard replay traces.jsonl.gz --logs logs.jsonl --out findings.jsonl\n"
        "  traceguard replay jaeger-export.json --format jaeger --report report.html\n")
    train = _command(
        commands, "train", "learn baselines, structure and forests from known-good trace files",
        "The models are written to --model-dir; replay --model-dir and serve --model-dir start from them.",
        "  traceguard train last-week/*.jsonl.gz --model-dir models/\n")
    for command in (replay, train):
        command.add_argument("traces", nargs="+", type=Path, metavar="TRACE_FILE",
                             help="OTLP/JSON lines, length-prefixed OTLP protobuf, Jaeger JSON or Zipkin v2 JSON; "
                                  "gzip or zstd compressed or not")
        command.add_argument("--format", default="auto", choices=FORMATS,
                             help="input format (default: sniffed per file)")
        command.add_argument("--logs", nargs="+", type=Path, default=[], metavar="LOG_FILE",
                             help="OTLP log files to link to the findings")
        command.add_argument("--out", type=Path, help="write findings as JSONL here instead of stdout")
        command.add_argument("--strict", action="store_true", help="a corrupt line or rejected span is fatal")
        _timing_flags(command, lateness=True)
        command.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    serve = _command(
        commands, "serve", "live sidecar: OTLP gRPC/HTTP receivers, SQLite store, HTTP API and /metrics",
        "Accepted requests go to a write-ahead log first (a crash loses no acknowledged span) and, with "
        "--forward-to, on to your Collector unchanged. Runs until SIGTERM/SIGINT.",
        "  traceguard serve --state-dir /var/lib/traceguard --forward-to otel-collector:4317\n"
        "  TRACEGUARD_SERVE__TOKEN=s3cret traceguard serve --grpc-listen 0.0.0.0:4317\n")
    serve.add_argument("--grpc-listen", help="OTLP/gRPC address (default 127.0.0.1:4317)")
    serve.add_argument("--http-listen", help="OTLP/HTTP address (default 127.0.0.1:4318)")
    serve.add_argument("--api-listen", help="HTTP API, health and /metrics address (default 127.0.0.1:8080)")
    serve.add_argument("--state-dir", help="write-ahead log, SQLite store and model snapshots (default ./.traceguard)")
    _timing_flags(serve, lateness=False)
    serve.add_argument("--forward-to", help="upstream OTLP/gRPC HOST:PORT that gets every accepted request")
    serve.add_argument("--model-dir", help="trained models (traceguard train) to start from if the state dir has none")
    serve.add_argument("--decided-topic", help="one judge for load-balanced instances: each sends the traces it "
                                               "decides to this topic and the instance that holds it detects on all")
    serve.add_argument("--bootstrap-servers", help="with --decided-topic: Kafka brokers, HOST:PORT[,HOST:PORT...]")
    serve.add_argument("--group", help="with --decided-topic: the instances' group name (default traceguard)")
    consume = _command(
        commands, "consume", "Kafka stream processor reading the Collector's kafka exporter topics",
        "A member of a consumer group: offsets are committed only up to what is decided and stored, so a crash "
        "or a rebalance loses nothing. Runs until SIGTERM/SIGINT, or with --exit-at-end until caught up.",
        "  traceguard consume --bootstrap-servers kafka:9092 --state-dir state/\n"
        "  traceguard consume --bootstrap-servers kafka:9092 --time event --initial-offset earliest "
        "--exit-at-end --out backfill.jsonl\n")
    consume.add_argument("--bootstrap-servers", help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    consume.add_argument("--group", help="consumer group (default traceguard)")
    consume.add_argument("--traces-topic", help="spans topic (default otlp_spans)")
    consume.add_argument("--logs-topic", help="logs topic (default otlp_logs; '' for none)")
    consume.add_argument("--encoding", help="otlp_proto (default) or otlp_json")
    consume.add_argument("--time", help="wall (default, live) or event (backfills: the replay watermark)")
    consume.add_argument("--initial-offset", help="earliest or latest (default): where a new group starts")
    consume.add_argument("--state-dir", help="SQLite store, model snapshots and checkpoint")
    consume.add_argument("--out", help="also append findings as JSONL to this file")
    consume.add_argument("--anomalies-topic", help="findings topic (default traceguard_anomalies; '' for none)")
    consume.add_argument("--dead-letter-topic", help="copy undecodable records here")
    consume.add_argument("--api-listen", help="serve the HTTP API and /metrics on HOST:PORT")
    consume.add_argument("--decided-topic", help="one judge for the group: members send decided traces to this "
                                                 "topic and the member that holds it detects on all of them")
    consume.add_argument("--exit-at-end", action="store_const", const=True,
                         help="stop once caught up with the end offsets seen at start and everything is decided")
    _timing_flags(consume, lateness=True)
    replay.add_argument("--report", type=Path, metavar="HTML_FILE",
                        help="also write a self-contained HTML report: the web view's pages (incidents, findings, traces, "
                             "stages) with the data inlined, opened from the file")
    replay.add_argument("--incidents-out", type=Path, metavar="FILE",
                        help="also write incidents as JSONL, one line per incident state change")
    replay.add_argument("--model-dir", type=Path, help="start the learned detectors from this model directory")
    train.add_argument("--model-dir", type=Path, required=True,
                       help="model directory to write (and to start from, if it holds models)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Where a stuck process is: SIGUSR1 prints every thread's stack and goes on
    # (an operator's question); SIGABRT prints them and ends it (a test that gave up).
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.command in ("replay", "train"):
        tune_gc()
    flags = {
        "assembler.decision_wait": args.decision_wait,
        "assembler.max_trace_age": args.max_trace_age,
    }
    if args.command == "serve":
        flags.update({"serve.grpc_listen": args.grpc_listen, "serve.http_listen": args.http_listen,
                      "serve.api_listen": args.api_listen, "serve.state_dir": args.state_dir,
                      "serve.forward_to": args.forward_to, "serve.model_dir": args.model_dir,
                      "consume.decided_topic": args.decided_topic, "consume.bootstrap_servers": args.bootstrap_servers,
                      "consume.group": args.group})
    elif args.command == "consume":
        flags["assembler.allowed_lateness"] = args.allowed_lateness
        flags.update({f"consume.{name}": getattr(args, name) for name in (
            "bootstrap_servers", "group", "traces_topic", "logs_topic", "encoding", "time", "initial_offset",
            "state_dir", "out", "anomalies_topic", "dead_letter_topic", "api_listen", "exit_at_end",
            "decided_topic")})
    else:
        flags["assembler.allowed_lateness"] = args.allowed_lateness
    try:
        config = load_config(args.config, flags, warn=lambda message: print(f"traceguard: {message}", file=sys.stderr))
    except ConfigError as exc:
        print(f"traceguard: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from traceguard import serve

        try:
            return serve.run(config)
        except (OSError, RuntimeError, ModelFileError) as exc:  # KafkaError is a RuntimeError
            print(f"traceguard: cannot serve: {_reason(exc, config)}", file=sys.stderr)
            return 2
    if args.command == "consume":
        from traceguard import consume

        try:
            status, metrics = consume.run(config)
        except (OSError, RuntimeError, ModelFileError) as exc:  # KafkaError is a RuntimeError
            print(f"traceguard: cannot consume: {_reason(exc, config)}", file=sys.stderr)
            return 2
        _print_summary(metrics.snapshot(), "consume")
        return status
    models = None
    if args.model_dir is not None and (args.command == "replay" or store.exists(args.model_dir)):
        try:
            models = store.load(args.model_dir, config.learned)
        except ModelFileError as exc:
            print(f"traceguard: {exc}", file=sys.stderr)
            return 2
    return _replay(args, config, models)


def _reason(exc: Exception, config) -> str:
    """What stopped a front end, said plainly (kafka-python names an unreachable broker only by its class)."""
    from kafka.errors import NoBrokersAvailable

    if isinstance(exc, NoBrokersAvailable):
        return f"no Kafka broker answers at {config.consume.bootstrap_servers}"
    return str(exc)


def _replay(args, config, models) -> int:
    training = args.command == "train"
    if args.out:
        try:
            out = open(args.out, "w", encoding="utf-8")
        except OSError as exc:
            print(f"traceguard: cannot write --out {args.out}: {exc}", file=sys.stderr)
            return 2
    else:
        out = open(os.devnull, "w") if training else sys.stdout
    sink = JsonlSink(out, owns_stream=bool(args.out) or training)
    progress = None
    if sys.stderr.isatty() and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(unit=" records", unit_scale=True, file=sys.stderr, desc="replay")
    tally = _StageTally()
    sinks = [sink, tally]
    incidents_out = getattr(args, "incidents_out", None)
    if incidents_out is not None:
        try:
            sinks.append(JsonlSink(open(incidents_out, "w", encoding="utf-8"), owns_stream=True, incidents=True))
        except OSError as exc:
            print(f"traceguard: cannot write --incidents-out {incidents_out}: {exc}", file=sys.stderr)
            return 2
    report = None
    if getattr(args, "report", None) is not None:
        from traceguard.report import ReportCollector

        report = ReportCollector(config.store.trace_spans)
    try:
        result = run_replay(args.traces, args.logs, config, [*sinks, *([report] if report else [])],
                            strict=args.strict, on_batch=progress.update if progress else None,
                            warn=progress.write if progress else _warn, models=models, fmt=args.format,
                            keep_trace=report.keep_trace if report else None)
    except (FileNotFoundError, ReplayAborted, WrongFormat) as exc:
        print(f"traceguard: {exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    counts = result.metrics.snapshot()
    if counts.get("traceguard_replay_corrupt_total") and not counts.get("traceguard_spans_accepted_total") \
            and not _total(counts.get("traceguard_spans_rejected_total")):
        print(f"traceguard: no span could be read from the input ({counts['traceguard_replay_corrupt_total']} "
              "corrupt line(s)): is it OTLP, Jaeger or Zipkin trace data? (--format)", file=sys.stderr)
        return 2
    if report is not None:
        report.render(args.report, result.series, config.ui)
        print(f"traceguard replay: report written to {args.report}", file=sys.stderr)
    _print_summary(counts, args.command, tally)
    if training:
        store.save(result.models, args.model_dir)
        print(f"traceguard train: models written to {args.model_dir}", file=sys.stderr)
    return 0


def _total(value) -> int:
    return sum(value.values()) if isinstance(value, dict) else (value or 0)


def _warn(message: str) -> None:
    print(f"traceguard: {message}", file=sys.stderr)


class _StageTally:
    """A sink that counts findings by stage, for the summary's top-stages table.

    Counts only (memory must not grow with the input); a stage-level finding
    emitted again under its id (a regression that resolved) counts once.
    """

    def __init__(self) -> None:
        from collections import Counter

        self.counts: Counter = Counter()
        self._stage_level: set[str] = set()
        self.incidents: dict = {}  # last state of each; few (one per fault)

    def emit_incident(self, incident) -> None:
        self.incidents[incident.id] = incident

    def emit(self, anomaly) -> None:
        if anomaly.trace_id is None:
            if anomaly.id in self._stage_level:
                return
            self._stage_level.add(anomaly.id)
        self.counts[(anomaly.kind.value, anomaly.service or "-", anomaly.operation or "-")] += 1

    def flush(self) -> None:
        """Counts only."""

    def close(self) -> None:
        """Counts only."""


def _print_summary(snapshot: dict, command: str, tally: _StageTally | None = None) -> None:
    by_kind: dict[str, int] = {}
    anomalies = snapshot.get("traceguard_anomalies_total", {})
    for labels, count in (anomalies.items() if isinstance(anomalies, dict) else ()):
        kind = dict(part.split("=", 1) for part in labels.split(","))["kind"]
        by_kind[kind] = by_kind.get(kind, 0) + count
    decided = snapshot.get("traceguard_traces_decided_total", {})
    traces = _total(decided)
    records = snapshot.get("traceguard_kafka_records_total")
    read = f"{sum(records.values())} records, " if isinstance(records, dict) else ""
    incidents = list(tally.incidents.values()) if tally is not None else []
    lines = [f"traceguard {command}: {read}{snapshot.get('traceguard_spans_accepted_total', 0)} spans, "
             f"{traces} traces, {len(incidents)} incidents, {sum(by_kind.values())} anomalies"]
    attached = snapshot.get("traceguard_findings_attached_total", {})
    if incidents:
        lines.append(f"  {'incident onset':<21} {'state':<9} {'explained':>9}  culprit")
        for incident in sorted(incidents, key=lambda i: i.onset)[:20]:
            onset = dt.datetime.fromtimestamp(incident.onset / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            lead = incident.culprits[0]
            lines.append(f"  {onset:<21} {incident.state:<9} {sum(incident.attached.values()):>9}  "
                         f"{lead.service} {lead.operation!r} ({lead.signal} {times(lead.magnitude)})"
                         + (f" on pod {lead.instance}" if lead.instance else ""))
        if len(incidents) > 20:
            lines.append(f"  … and {len(incidents) - 20} more")
    if isinstance(attached, dict) and attached:
        lines.append(f"  per-trace findings kept on their incidents (not listed one by one): {sum(attached.values())}")
    lines += [f"  {'kind':<26} {'count':>8}"] if by_kind else []
    lines += [f"  {kind:<26} {count:>8}" for kind, count in sorted(by_kind.items())]
    if tally is not None and tally.counts:
        top = tally.counts.most_common(10)
        width = max(len(f"{service} '{operation}'") for (_, service, operation), _ in top)
        lines.append(f"  {'top stages':<{width}}  {'kind':<26} {'count':>8}")
        lines += [f"  {service + ' ' + repr(operation):<{width}}  {kind:<26} {count:>8}"
                  for (kind, service, operation), count in top]
    for name, labels, count in _counts(snapshot):
        words = _COUNT_WORDS.get(f"{name}{{{labels}}}") or _COUNT_WORDS[name]
        lines.append(f"  {words.format(n=count, labels=labels)} ({name}{f'{{{labels}}}' if labels else ''})")
    print("\n".join(lines), file=sys.stderr)


# The counts the summary reports, in words: what happened and whether it is a loss.
_COUNT_WORDS = {
    "traceguard_replay_corrupt_total": "{n} input line(s) could not be read and were skipped",
    "traceguard_replay_out_of_order_total": "{n} record(s) came out of time order and were merged in",
    "traceguard_spans_rejected_total": "{n} span(s) rejected as invalid (ids, times), the rest of their records kept",
    "traceguard_logs_rejected_total": "{n} log record(s) rejected as invalid",
    "traceguard_traces_evicted_total": "{n} trace(s) decided early at the in-flight bound "
                                       "(assembler.max_spans_in_flight, max_traces_in_flight)",
    "traceguard_logs_evicted_total{reason=ttl}": "{n} log record(s) expired after logs.ttl with no finding to "
                                                  "link them to (normal)",
    "traceguard_logs_evicted_total": "{n} log record(s) dropped at logs.max_records before their trace was judged",
    "traceguard_logs_dropped_total": "{n} log record(s) past logs.max_per_trace for one trace, not kept",
    "traceguard_spans_far_ahead_total": "{n} span(s) ended more than assembler.max_ahead past the newest time "
                                        "(a clock off?); they did not move event time alone",
    "traceguard_kafka_poison_records_total": "{n} Kafka record(s) could not be decoded and were skipped ({labels})",
    "traceguard_kafka_dead_letters_total": "{n} of them written to the dead-letter topic ({labels})",
    "traceguard_kafka_traces_dropped_on_revoke_total": "{n} undecided trace(s) left to another consumer at a rebalance",
}


def _counts(snapshot: dict):
    """(name, labels, count) of every summary count that is not zero, in ``_COUNT_WORDS`` order."""
    for name in dict.fromkeys(key.split("{")[0] for key in _COUNT_WORDS):
        value = snapshot.get(name)
        if isinstance(value, dict):
            yield from ((name, labels, count) for labels, count in value.items() if count)
        elif value:
            yield name, "", value
