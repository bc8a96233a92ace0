"""LogIndex: log records by trace id, bounded in count and age.

Logs arrive on their own path and usually before their trace is decided; the
index keeps them until then, each record once: an at-least-once source
delivers some again (a Kafka partition re-read after a rebalance, an
exporter's retry), and a finding must not list a record twice. Two records
alike in span, time, severity, body and service are taken as one. Bounds: ``max_records`` in all (the traces whose
logs came first are evicted first), ``max_per_trace``, and ``ttl`` against the
pipeline clock. Everything dropped at a bound is counted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

from traceguard.config import LogConfig
from traceguard.metrics import Metrics
from traceguard.records import SEVERITY_ERROR, Anomaly, LinkedLog, LogRow


class LogIndex:
    def __init__(self, config: LogConfig, now: Callable[[], int], metrics: Metrics) -> None:
        self._config = config
        self._now = now
        self._metrics = metrics
        # trace id → (first arrival stamp, records)
        self._by_trace: OrderedDict[bytes, tuple[int, list[LogRow]]] = OrderedDict()
        self.records = 0
        metrics.gauge("traceguard_log_records_indexed", lambda: self.records)

    def add(self, rows: Iterable[LogRow]) -> None:
        config = self._config
        now = self._now()
        by_trace = self._by_trace
        indexed = 0
        for row in rows:
            entry = by_trace.get(row.trace_id)
            if entry is None:
                # The record's own time when it is ahead: on event time, logs read
                # before any span (the watermark still at its start) must not
                # look a lifetime old and be evicted at once.
                entry = by_trace[row.trace_id] = (max(now, row.time), [])
            records = entry[1]
            if records and any(_same(row, held) for held in records):
                self._metrics.inc("traceguard_logs_dropped_total", reason="duplicate")
                continue
            if len(records) >= config.max_per_trace:
                self._metrics.inc("traceguard_logs_dropped_total", reason="per_trace_bound")
                continue
            records.append(row)
            indexed += 1
        # counted once per call: an increment takes a lock and a labelled lookup, per record it cost as much as indexing
        self.records += indexed
        if indexed:
            self._metrics.inc("traceguard_logs_indexed_total", indexed)
        self._evict(now)

    def get(self, trace_id: bytes) -> list[LogRow]:
        entry = self._by_trace.get(trace_id)
        return entry[1] if entry else []

    def drop(self, trace_ids) -> None:
        """Forgets these traces' records: they will be read again from the source."""
        for trace_id in trace_ids:
            entry = self._by_trace.pop(trace_id, None)
            if entry is not None:
                self.records -= len(entry[1])

    def _evict(self, now: int) -> None:
        horizon = now - self._config.ttl
        by_trace = self._by_trace
        evicted = {"ttl": 0, "bound": 0}
        while by_trace:
            trace_id, (stamp, records) = next(iter(by_trace.items()))
            if stamp >= horizon and self.records <= self._config.max_records:
                break
            by_trace.popitem(last=False)
            self.records -= len(records)
            evicted["ttl" if stamp < horizon else "bound"] += len(records)
        for reason, count in evicted.items():  # once per call, as for indexed records
            if count:
                self._metrics.inc("traceguard_logs_evicted_total", count, reason=reason)


def _same(a: LogRow, b: LogRow) -> bool:
    return (a.time == b.time and a.span_id == b.span_id and a.body == b.body
            and a.severity_number == b.severity_number and a.service == b.service)


def link_logs(anomaly: Anomaly, logs: list[LogRow], limit: int) -> None:
    """Attaches up to ``limit`` records to ``anomaly`` (see ``select_logs``)."""
    if not logs or limit <= 0:
        return
    anomaly.logs = select_logs(logs, limit, bytes.fromhex(anomaly.span_id) if anomaly.span_id else None)


def select_logs(logs: list[LogRow], limit: int, own: bytes | None = None) -> list[LinkedLog]:
    """Up to ``limit`` records: the ``own`` span's errors first, then its other
    records, then the trace's errors, then the rest; each group in time order."""
    if not logs or limit <= 0:
        return []

    def rank(log: LogRow) -> tuple[int, int]:
        is_error = log.severity_number >= SEVERITY_ERROR
        if log.span_id == own and own is not None:
            group = 0 if is_error else 1
        else:
            group = 2 if is_error else 3
        return group, log.time

    return [
        LinkedLog(
            time_unix_nano=log.time,
            span_id=log.span_id.hex() if log.span_id else None,
            service=log.service,
            severity_number=log.severity_number,
            severity_text=log.severity_text,
            body=log.body,
        )
        for log in sorted(logs, key=rank)[:limit]
    ]
