"""SqliteStore: the embedded store of ``serve``: findings and incidents upserted by their deterministic ids.

Re-delivery, a replay after a crash, or a resolved regression all write the
same id again, so the table holds one row per finding, last version wins.
Rows keep the sequence number of their first insert, which is what the API
pages by (a cursor that does not move under updates).

Rows are written in transactions of up to ``_TRANSACTION_ROWS``, committed
at ``flush`` (``serve`` flushes at the end of every tick and before it trims
its write-ahead log; ``consume`` before it commits offsets): a commit per row
cost 50 µs, about 30 µs more than a row in a shared transaction. Reads share
the connection, so they see a row as soon as it is written.

When the database refuses writes (disk full, I/O error), the rows of the
failed transaction and every later one are held in
order in a bounded backlog instead of being lost, ``failing`` says why (the
receivers stop accepting and ``/readyz`` says not ready while it is set), and
``retry`` writes the backlog once the disk takes writes again. Past the bound,
rows are dropped and counted (``dropped_``).

The spans of every trace with a finding are kept too (``keep_trace``, at
most ``store.trace_spans`` of them, with its logs), so the web view's trace
page works after the fact.

Retention (``store.*``): ``prune`` deletes findings older than ``max_age``
and resolved incidents last updated before it, then the oldest findings
while the data passes ``max_bytes``, and with them the kept traces no
finding points to any more; each deletion is counted
(``traceguard_store_deleted_total{reason}``).

The schema is versioned (``PRAGMA user_version``): a store from an older
traceguard is migrated on open, one from a newer one is refused (its rows
may mean something this one does not know).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path

import orjson

from traceguard.config import StoreConfig
from traceguard.link import link_logs
from traceguard.metrics import Metrics
from traceguard.records import Anomaly, Incident, LogRow, Trace, trace_view

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anomalies (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    trace_id TEXT,
    service TEXT,
    operation TEXT,
    event_time INTEGER NOT NULL,
    detected_at INTEGER NOT NULL,
    body TEXT NOT NULL,
    incident_id TEXT
);
CREATE INDEX IF NOT EXISTS anomalies_trace ON anomalies (trace_id);
CREATE INDEX IF NOT EXISTS anomalies_incident ON anomalies (incident_id);
CREATE INDEX IF NOT EXISTS anomalies_kind ON anomalies (kind, seq);
CREATE INDEX IF NOT EXISTS anomalies_detected ON anomalies (detected_at);
CREATE TABLE IF NOT EXISTS incidents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    service TEXT NOT NULL,
    operation TEXT NOT NULL,
    onset INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    stages TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_state ON incidents (state, seq);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    stored_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_stored ON traces (stored_at);
"""
log = logging.getLogger(__name__)
_BACKLOG = 100_000  # rows held while the database refuses writes
_TRANSACTION_ROWS = 512  # rows written in one transaction at most (a flush commits sooner)
# Schema versions and the statements that bring a store of the version before up to
# each: 1 is the first schema (before incidents; written without a user_version),
# 2 added the incident of a finding, 3 the spans of traces with findings (a new
# table, which _SCHEMA creates). _SCHEMA is the latest.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE anomalies ADD COLUMN incident_id TEXT",),
    3: (),
}
SCHEMA_VERSION = max(_MIGRATIONS)
_PRUNE_CHUNK = 1000  # findings deleted per statement while over max_bytes


class StoreUnusable(RuntimeError):
    """The store file cannot be opened or written at start; the message says which file and why."""


class SqliteStore:
    def __init__(self, path: Path, retention: StoreConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        """Raises:
            StoreUnusable: the file is not a database, is corrupt, cannot be written, or
            was written by a newer traceguard.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate(path)
        except sqlite3.DatabaseError as exc:
            raise StoreUnusable(f"the findings store {path} cannot be used: {exc} (move it aside to start "
                                "a new one)") from None
        self._retention = retention or StoreConfig()
        self._metrics = metrics
        self._next_prune = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._backlog: deque[tuple[str, tuple]] = deque()
        self._uncommitted: list[tuple[str, tuple]] = []  # the open transaction's rows, held if it fails
        self.failing: str | None = None  # why writes fail, while they do
        self.dropped_ = 0

    def _migrate(self, path: Path) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnusable(f"the findings store {path} has schema version {version}, written by a newer "
                                f"traceguard (this one knows up to {SCHEMA_VERSION}); run that one, or move the "
                                "file aside to start a new one")
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'anomalies'").fetchone() is not None:
            if version == 0:  # written before versions: the first schema, or the second
                columns = {row[1] for row in db.execute("PRAGMA table_info(anomalies)")}
                version = 2 if "incident_id" in columns else 1
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
        db.executescript(_SCHEMA)  # a new store, or the tables and indexes added since
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def prune_if_due(self, now: int) -> dict[str, int] | None:
        """``prune`` every ``store.prune_interval`` (wall time between calls)."""
        if time.monotonic() < self._next_prune:
            return None
        self._next_prune = time.monotonic() + self._retention.prune_interval / 1e9
        return self.prune(now)

    def prune(self, now: int) -> dict[str, int]:
        """Applies retention at pipeline time ``now``; returns the rows deleted by reason."""
        deleted = {"age": 0, "size": 0}
        horizon = now - self._retention.max_age
        with self._lock:
            if self._closed:
                return deleted
            self._commit_or_hold()  # a failed delete may roll back the open transaction
            try:
                deleted["age"] = self._db.execute("DELETE FROM anomalies WHERE detected_at < ?", (horizon,)).rowcount
                deleted["age"] += self._db.execute(
                    "DELETE FROM incidents WHERE state = 'resolved' AND updated_at < ?", (horizon,)).rowcount
                self._db.execute("DELETE FROM traces WHERE stored_at < ?", (horizon,))
                while self._used_bytes() > self._retention.max_bytes * 0.9:
                    # a tenth at a time (at most _PRUNE_CHUNK): no more than needed goes
                    total = self._db.execute("SELECT count(*) FROM anomalies").fetchone()[0]
                    removed = self._db.execute(
                        "DELETE FROM anomalies WHERE seq IN (SELECT seq FROM anomalies ORDER BY seq LIMIT ?)",
                        (max(1, min(_PRUNE_CHUNK, total // 10)),)).rowcount
                    if not removed:
                        break
                    deleted["size"] += removed
                    self._db.execute("DELETE FROM traces WHERE trace_id NOT IN "
                                     "(SELECT trace_id FROM anomalies WHERE trace_id IS NOT NULL)")
            except sqlite3.OperationalError as exc:  # a full disk: deleting may need the journal; next time
                # Not ``failing``: that is the writes' to set and to clear (retry clears it only while
                # rows are held back), and a failed prune loses nothing.
                log.warning("store retention could not delete this time: %s", exc)
        if self._metrics is not None:
            for reason, count in deleted.items():
                if count:
                    self._metrics.inc("traceguard_store_deleted_total", count, reason=reason)
        return deleted

    def _used_bytes(self) -> int:
        pages, free, size = (self._db.execute(f"PRAGMA {name}").fetchone()[0]
                             for name in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def _write(self, statement: str, values: tuple) -> None:
        with self._lock:
            if not self._backlog:
                try:
                    if not self._uncommitted:
                        self._db.execute("BEGIN")
                    self._db.execute(statement, values)
                except sqlite3.OperationalError as exc:  # disk full, I/O error, read-only
                    self._hold_uncommitted(exc)
                else:
                    self._uncommitted.append((statement, values))
                    if len(self._uncommitted) >= _TRANSACTION_ROWS:
                        self._commit_or_hold()
                    return
            self._hold((statement, values))

    def _hold(self, row: tuple[str, tuple]) -> None:
        if len(self._backlog) < _BACKLOG:
            self._backlog.append(row)
        else:
            self.dropped_ += 1

    def _hold_uncommitted(self, exc: sqlite3.OperationalError) -> None:
        """The open transaction failed: its rows go first into the backlog, in order."""
        self.failing = str(exc)
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        for row in self._uncommitted:
            self._hold(row)
        self._uncommitted.clear()

    def _commit_or_hold(self) -> None:
        """Commits the open transaction (under the lock), or holds its rows if that fails."""
        if not self._uncommitted:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._hold_uncommitted(exc)
        else:
            self._uncommitted.clear()

    def retry(self) -> bool:
        """Writes the held rows, in order; whether none is left (after ``close``: whether
        none was left)."""
        with self._lock:
            if self._closed:
                return not self._backlog
            while self._backlog:
                try:
                    self._db.execute(*self._backlog[0])
                except sqlite3.OperationalError as exc:
                    self.failing = str(exc)
                    return False
                self._backlog.popleft()
            self.failing = None
            return True

    def emit(self, anomaly: Anomaly) -> None:
        self._write(
            "INSERT INTO anomalies (id, kind, trace_id, service, operation, event_time, detected_at, body, "
            "incident_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "detected_at = excluded.detected_at, body = excluded.body, incident_id = excluded.incident_id",
            (anomaly.id, anomaly.kind.value, anomaly.trace_id, anomaly.service, anomaly.operation,
             anomaly.event_time, anomaly.detected_at, anomaly.model_dump_json(), anomaly.incident_id),
        )

    def emit_incident(self, incident: Incident) -> None:
        stages = "|".join(f"{s.service}\x1f{s.operation}" for s in (*incident.culprits, *incident.affected))
        self._write(
            "INSERT INTO incidents (id, state, service, operation, onset, updated_at, stages, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET state = excluded.state, "
            "service = excluded.service, operation = excluded.operation, onset = excluded.onset, "
            "updated_at = excluded.updated_at, stages = excluded.stages, body = excluded.body",
            (incident.id, incident.state, incident.service, incident.operation, incident.onset,
             incident.updated_at, stages, incident.model_dump_json()),
        )

    def keep_trace(self, trace: Trace, exemplar: bool = False) -> None:
        """The spans and logs of a trace with findings or of an incident's exemplar, for its page."""
        self._write(
            "INSERT INTO traces (trace_id, stored_at, body) VALUES (?, ?, ?) ON CONFLICT(trace_id) DO UPDATE SET "
            "stored_at = excluded.stored_at, body = excluded.body",
            (trace.trace_id.hex(), trace.decided_at,
             orjson.dumps(trace_view(trace, self._retention.trace_spans)).decode()),
        )

    def trace(self, trace_id: str) -> dict | None:
        """A kept trace (``records.trace_view``), or None."""
        with self._lock:
            row = self._db.execute("SELECT body FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def get_incident(self, incident_id: str) -> tuple[Incident, list[Anomaly]] | None:
        """The incident and the findings stored with its id (its stage-level ones and exemplars)."""
        with self._lock:
            row = self._db.execute("SELECT body FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            if row is None:
                return None
            found = self._db.execute("SELECT body FROM anomalies WHERE incident_id = ? ORDER BY seq",
                                     (incident_id,)).fetchall()
        return Incident.model_validate_json(row[0]), [Anomaly.model_validate_json(body) for (body,) in found]

    def incidents(self, *, service: str | None = None, operation: str | None = None, since: int | None = None,
                  state: str | None = None, limit: int = 100,
                  cursor: int | None = None) -> tuple[list[Incident], int | None]:
        """Incidents in the order they opened after ``cursor``. ``service``/``operation``
        match a culprit or an affected stage; ``since`` the last update."""
        where, values = ["seq > ?"], [cursor or 0]
        if state is not None:
            where.append("state = ?")
            values.append(state)
        if since is not None:
            where.append("updated_at >= ?")
            values.append(since)
        with self._lock:
            rows = self._db.execute(
                f"SELECT seq, body, stages FROM incidents WHERE {' AND '.join(where)} ORDER BY seq", values,
            ).fetchall() if (service or operation) else self._db.execute(
                f"SELECT seq, body, stages FROM incidents WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
                (*values, limit + 1),
            ).fetchall()
        if service or operation:
            rows = [r for r in rows if any(
                (service is None or s == service) and (operation is None or o == operation)
                for s, _, o in (stage.partition("\x1f") for stage in r[2].split("|")))][: limit + 1]
        items = [Incident.model_validate_json(body) for _, body, _ in rows[:limit]]
        return items, (rows[limit - 1][0] if len(rows) > limit else None)

    def get(self, anomaly_id: str) -> Anomaly | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM anomalies WHERE id = ?", (anomaly_id,)).fetchone()
        return Anomaly.model_validate_json(row[0]) if row else None

    def query(self, *, kind: str | None = None, service: str | None = None, operation: str | None = None,
              trace_id: str | None = None, since: int | None = None, limit: int = 100,
              cursor: int | None = None, newest_first: bool = False) -> tuple[list[Anomaly], int | None]:
        """Findings in insertion order after ``cursor`` (``newest_first``: the other way,
        before it); returns them and the next cursor (None at the end)."""
        where, values = (["seq < ?"], [cursor or 2**63 - 1]) if newest_first else (["seq > ?"], [cursor or 0])
        for column, value in (("kind", kind), ("service", service), ("operation", operation), ("trace_id", trace_id)):
            if value is not None:
                where.append(f"{column} = ?")
                values.append(value)
        if since is not None:
            where.append("detected_at >= ?")
            values.append(since)
        with self._lock:
            rows = self._db.execute(
                f"SELECT seq, body FROM anomalies WHERE {' AND '.join(where)} ORDER BY seq "
                f"{'DESC' if newest_first else ''} LIMIT ?", (*values, limit + 1),
            ).fetchall()
        items = [Anomaly.model_validate_json(body) for _, body in rows[:limit]]
        return items, (rows[limit - 1][0] if len(rows) > limit else None)

    def relink(self, trace_id: bytes, logs: list[LogRow], limit: int) -> int:
        """Re-links a decided trace's findings after more of its logs arrived; returns how many changed."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM anomalies WHERE trace_id = ?", (trace_id.hex(),)).fetchall()
        changed = 0
        for (body,) in rows:
            anomaly = Anomaly.model_validate_json(body)
            before = len(anomaly.logs)
            link_logs(anomaly, logs, limit)
            if len(anomaly.logs) != before:
                self.emit(anomaly)
                changed += 1
        return changed

    def flush(self) -> None:
        """Commits the rows written since the last flush; rows the database refuses
        are held back (``backlog``, ``failing``), not raised."""
        with self._lock:
            if not self._closed:
                self._commit_or_hold()

    def close(self) -> None:
        """Closes the database; rows it still refuses are lost, which ``backlog`` says."""
        self.flush()
        self.retry()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

