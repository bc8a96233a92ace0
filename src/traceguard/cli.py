"""Command line: ``traceguard replay`` (and the modes to come)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from traceguard import __version__
from traceguard.config import ConfigError, load_config
from traceguard.replay import ReplayAborted, run_replay
from traceguard.sinks import JsonlSink


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traceguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"traceguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="detect anomalies in exported trace files (event time)")
    replay.add_argument("traces", nargs="+", type=Path, metavar="TRACE_FILE",
                        help="OTLP/JSON lines or length-prefixed OTLP protobuf, optionally gzip-compressed")
    replay.add_argument("--logs", nargs="+", type=Path, default=[], metavar="LOG_FILE",
                        help="OTLP log files to link to the findings")
    replay.add_argument("--out", type=Path, help="write findings as JSONL here instead of stdout")
    replay.add_argument("--strict", action="store_true", help="a corrupt line or rejected span is fatal")
    replay.add_argument("--config", type=Path, help="TOML or JSON file with the pipeline settings")
    replay.add_argument("--decision-wait", help="quiet time before a rooted trace is decided (default 30s)")
    replay.add_argument("--max-trace-age", help="age at which any trace is decided (default 5m)")
    replay.add_argument("--allowed-lateness", help="event-time out-of-orderness tolerated (default 5s)")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, {
            "assembler.decision_wait": args.decision_wait,
            "assembler.max_trace_age": args.max_trace_age,
            "assembler.allowed_lateness": args.allowed_lateness,
        })
    except ConfigError as exc:
        print(f"traceguard: {exc}", file=sys.stderr)
        return 2
    return _replay(args, config)


def _replay(args, config) -> int:
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    sink = JsonlSink(out, owns_stream=bool(args.out))
    progress = None
    if sys.stderr.isatty() and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(unit=" records", unit_scale=True, file=sys.stderr, desc="replay")
    try:
        result = run_replay(args.traces, args.logs, config, [sink], strict=args.strict,
                            on_batch=progress.update if progress else None,
                            warn=progress.write if progress else _warn)
    except (FileNotFoundError, ReplayAborted) as exc:
        print(f"traceguard: {exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    _print_summary(result.metrics.snapshot())
    return 0


def _warn(message: str) -> None:
    print(f"traceguard: {message}", file=sys.stderr)


def _print_summary(snapshot: dict) -> None:
    by_kind: dict[str, int] = {}
    anomalies = snapshot.get("traceguard_anomalies_total", {})
    for labels, count in (anomalies.items() if isinstance(anomalies, dict) else ()):
        kind = dict(part.split("=", 1) for part in labels.split(","))["kind"]
        by_kind[kind] = by_kind.get(kind, 0) + count
    decided = snapshot.get("traceguard_traces_decided_total", {})
    traces = sum(decided.values()) if isinstance(decided, dict) else decided
    lines = [f"traceguard replay: {snapshot.get('traceguard_spans_accepted_total', 0)} spans, "
             f"{traces} traces, {sum(by_kind.values())} anomalies"]
    lines += [f"  {kind:<26} {count:>8}" for kind, count in sorted(by_kind.items())]
    for name in ("traceguard_replay_corrupt_total", "traceguard_spans_rejected_total",
                 "traceguard_logs_rejected_total", "traceguard_traces_evicted_total",
                 "traceguard_logs_evicted_total", "traceguard_logs_dropped_total"):
        value = snapshot.get(name)
        if isinstance(value, dict):
            lines += [f"  {name}{{{labels}}}: {count}" for labels, count in value.items()]
        elif value:
            lines.append(f"  {name}: {value}")
    print("\n".join(lines), file=sys.stderr)
