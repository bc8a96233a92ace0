"""The findings store: retention by age and by size, counted; the schema version and its migration."""

from __future__ import annotations

import sqlite3

import pytest

from builders import T0, row, tid
from traceguard.assemble.assembler import to_span
from traceguard.config import StoreConfig
from traceguard.detect.base import finding
from traceguard.metrics import Metrics
from traceguard.records import AnomalyKind, Incident
from traceguard.sinks import sqlite as sqlite_module
from traceguard.sinks.sqlite import SCHEMA_VERSION, SqliteStore, StoreUnusable

DAY = 86_400 * 10**9


def _finding(n: int, detected_at: int, padding: int = 0):
    span = to_span(row(n, 1))
    return finding(AnomalyKind.MISSING_ROOT, tid(n), span, detected_at=detected_at, event_time=detected_at,
                   severity="warning", score=1.0, summary="x" * padding, evidence={})


def _incident(n: int, state: str, updated_at: int) -> Incident:
    return Incident(id=f"{n:032x}", state=state, service="api", operation="GET /", onset=updated_at - 1,
                    opened_at=updated_at - 1, updated_at=updated_at, severity="warning", summary="s", culprits=[])


def test_findings_and_resolved_incidents_past_max_age_are_deleted_and_counted(tmp_path):
    metrics = Metrics()
    store = SqliteStore(tmp_path / "a.sqlite", StoreConfig(max_age="7d"), metrics)
    now = T0 + 30 * DAY
    for n, age_days in enumerate((10, 8, 6, 1), start=1):
        store.emit(_finding(n, now - age_days * DAY))
    store.emit_incident(_incident(1, "resolved", now - 9 * DAY))
    store.emit_incident(_incident(2, "open", now - 9 * DAY))  # still open: kept, whatever its age
    store.emit_incident(_incident(3, "resolved", now - 2 * DAY))
    assert store.prune(now) == {"age": 3, "size": 0}
    assert [a.trace_id for a in store.query()[0]] == [tid(3).hex(), tid(4).hex()]
    assert sorted(i.id for i in store.incidents()[0]) == [f"{2:032x}", f"{3:032x}"]
    assert metrics.get("traceguard_store_deleted_total", reason="age") == 3
    store.close()


def test_past_max_bytes_the_oldest_findings_go_until_the_data_is_under_90_percent(tmp_path):
    metrics = Metrics()
    store = SqliteStore(tmp_path / "a.sqlite", StoreConfig(max_bytes=1 << 20), metrics)
    for n in range(1, 1501):  # ~3 MB of findings
        store.emit(_finding(n, T0 + n, padding=2000))
    deleted = store.prune(T0 + 1500)
    assert deleted["age"] == 0 and deleted["size"] > 0
    assert store._used_bytes() <= 0.9 * (1 << 20)
    kept = [a.trace_id for a in store.query(limit=2000)[0]]
    assert kept == [tid(n).hex() for n in range(1501 - len(kept), 1501)]  # the newest, in order
    assert metrics.get("traceguard_store_deleted_total", reason="size") == deleted["size"] == 1500 - len(kept)
    store.close()


def test_a_store_of_the_first_schema_is_migrated_on_open(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE anomalies (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
            trace_id TEXT, service TEXT, operation TEXT, event_time INTEGER NOT NULL, detected_at INTEGER NOT NULL,
            body TEXT NOT NULL);
    """)
    old = _finding(1, T0)
    db.execute("INSERT INTO anomalies (id, kind, trace_id, service, operation, event_time, detected_at, body) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (old.id, old.kind.value, old.trace_id, old.service, old.operation,
                                                   old.event_time, old.detected_at, old.model_dump_json()))
    db.commit()
    db.close()
    store = SqliteStore(path)
    assert store.get(old.id) == old
    store.emit_incident(_incident(1, "open", T0))  # the incidents table was added
    store.emit(_finding(2, T0).model_copy(update={"incident_id": f"{1:032x}"}))
    assert [a.trace_id for a in store.get_incident(f"{1:032x}")[1]] == [tid(2).hex()]
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_written_by_a_newer_traceguard_is_refused_plainly(tmp_path):
    path = tmp_path / "new.sqlite"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreUnusable, match="written by a newer traceguard"):
        SqliteStore(path)


def test_a_prune_that_cannot_delete_does_not_make_the_store_refuse_writes(tmp_path, monkeypatch):
    """``failing`` stops the receivers and is cleared only by a write held back; a prune
    that fails (a full disk) holds nothing back, so it must not set it."""
    store = SqliteStore(tmp_path / "a.sqlite", StoreConfig(max_age="1m"))
    store.emit(_finding(1, T0))

    class Refusing:
        def __init__(self, db):
            self.db = db

        def execute(self, statement, *args):
            if statement.startswith("DELETE"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(statement, *args)

    monkeypatch.setattr(store, "_db", Refusing(store._db))
    assert store.prune(T0 + DAY) == {"age": 0, "size": 0}
    assert store.failing is None
    store.emit(_finding(2, T0 + DAY))
    assert [a.trace_id for a in store.query()[0]] == [tid(1).hex(), tid(2).hex()]


def test_the_spans_of_a_kept_trace_come_back_for_its_page_and_go_with_its_findings(tmp_path):
    from builders import decide

    store = SqliteStore(tmp_path / "a.sqlite", StoreConfig(max_age="7d", trace_spans=2))
    old, new = decide(row(1, 1), row(1, 2, 1), row(1, 3, 1)), decide(row(2, 1), row(2, 2, 1))
    old.decided_at, new.decided_at = T0, T0 + 6 * DAY
    for trace in (old, new):
        store.keep_trace(trace)
        store.emit(_finding(int.from_bytes(trace.trace_id, "big"), trace.decided_at))
    kept = store.trace(tid(1).hex())
    assert kept["spans_total"] == 3 and [s["span_id"] for s in kept["spans"]] == ["0000000000000001",
                                                                                "0000000000000002"]
    assert kept["spans"][1]["parent_span_id"] == "0000000000000001" and kept["spans"][0]["status"] == "unset"
    store.prune(T0 + 8 * DAY)  # the first trace's finding and spans are past max_age
    assert store.trace(tid(1).hex()) is None and store.trace(tid(2).hex()) is not None
    store.close()


def test_traces_no_finding_points_to_go_when_the_store_is_over_max_bytes(tmp_path):
    from builders import decide

    store = SqliteStore(tmp_path / "a.sqlite", StoreConfig(max_bytes=1 << 20))
    for n in range(1, 801):
        trace = decide(*(row(n, span, 1 if span > 1 else None, service="s" * 200) for span in range(1, 6)))
        store.keep_trace(trace)
        store.emit(_finding(n, T0 + n, padding=1000))
    store.prune(T0 + 800)
    kept = {a.trace_id for a in store.query(limit=1000)[0]}
    assert 0 < len(kept) < 800 and store._used_bytes() <= 0.9 * (1 << 20)
    assert all((store.trace(tid(n).hex()) is not None) == (tid(n).hex() in kept) for n in range(1, 801))
    store.close()


def test_findings_page_newest_first_with_a_cursor_that_pages_back(tmp_path):
    store = SqliteStore(tmp_path / "a.sqlite")
    for n in range(1, 6):
        store.emit(_finding(n, T0 + n))
    first, cursor = store.query(limit=2, newest_first=True)
    second, cursor = store.query(limit=2, newest_first=True, cursor=cursor)
    third, cursor = store.query(limit=2, newest_first=True, cursor=cursor)
    assert [a.trace_id for a in first + second + third] == [tid(n).hex() for n in (5, 4, 3, 2, 1)]
    assert cursor is None
    store.close()


def test_rows_are_committed_at_flush_and_a_refused_commit_holds_all_its_rows(tmp_path, monkeypatch):
    """Rows share a transaction until ``flush`` (a commit per row cost 50 µs): the API's
    reads see them at once, another reader of the file after the flush; a commit the
    disk refuses loses none of the transaction's rows."""
    path = tmp_path / "a.sqlite"
    store = SqliteStore(path)
    other = sqlite3.connect(path)
    store.emit(_finding(1, T0))
    assert len(store.query()[0]) == 1
    assert other.execute("SELECT count(*) FROM anomalies").fetchone()[0] == 0
    store.flush()
    assert other.execute("SELECT count(*) FROM anomalies").fetchone()[0] == 1

    class Refusing:
        def __init__(self, db):
            self.db = db
            self.in_transaction = True

        def execute(self, statement, *args):
            if statement == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(statement, *args)

    real = store._db
    monkeypatch.setattr(store, "_db", Refusing(real))
    for n in (2, 3, 4):
        store.emit(_finding(n, T0 + n))
    store.flush()
    assert store.failing == "database or disk is full" and store.backlog == 3
    store.emit(_finding(5, T0 + 5))  # behind the held rows, in order
    assert store.backlog == 4 and len(store.query()[0]) == 1
    monkeypatch.setattr(store, "_db", real)
    assert store.retry() and store.failing is None
    assert [a.trace_id for a in store.query()[0]] == [tid(n).hex() for n in range(1, 6)]
    assert other.execute("SELECT count(*) FROM anomalies").fetchone()[0] == 5
    # a transaction that fills up commits by itself; refused, each of its rows is held once
    monkeypatch.setattr(sqlite_module, "_TRANSACTION_ROWS", 2)
    monkeypatch.setattr(store, "_db", Refusing(real))
    for n in (6, 7):
        store.emit(_finding(n, T0 + n))
    assert store.backlog == 2
    monkeypatch.setattr(store, "_db", real)
    assert store.retry() and len(store.query()[0]) == 7
    store.close()
