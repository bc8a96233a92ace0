"""What a finding costs the embedded store: rows per second through ``SqliteStore``.

The findings of the labeled scenario (a replay of 8,000 traces, every detector)
(10 copies of each under ids of their own) are written through
``SqliteStore.emit`` as ``serve`` writes them, with a ``flush`` (a commit) after every ``--rows-per-flush`` rows: 1 is a
transaction per row (what the store did before it shared transactions), 64 is
about what one ``serve`` tick writes under load. The ceiling is SQLite itself:
the same statements and values through ``executemany`` in one transaction on a
fresh file. Rounds interleave; medians are reported, and each rate's ratio to
the ceiling of the same run.

Run ``python -m benchmarks.store_writes [--rounds N]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scenario import ScenarioConfig, write_scenario
from traceguard.records import Anomaly
from traceguard.sinks.sqlite import SqliteStore

FLUSH_EVERY = (1, 64)
COPIES = 10  # each finding written this many times under ids of its own: rows enough to time


def findings(tmp: Path) -> list[Anomaly]:
    write_scenario(tmp / "run", ScenarioConfig(traces=8000, seed=7, duration_s=8000 / 3), proto=True)
    subprocess.run([sys.executable, "-m", "traceguard", "replay", str(tmp / "run" / "traces.pb"), "--logs",
                    str(tmp / "run" / "logs.pb"), "--out", str(tmp / "findings.jsonl"), "--no-progress"],
                   check=True, capture_output=True)
    found = [Anomaly.model_validate_json(line) for line in (tmp / "findings.jsonl").read_text().splitlines()]
    return [a.model_copy(update={"id": f"{a.id}-{copy}"}) for copy in range(COPIES) for a in found]


def through_store(path: Path, found: list[Anomaly], flush_every: int) -> float:
    store = SqliteStore(path)
    start = time.perf_counter()
    for n, anomaly in enumerate(found, 1):
        store.emit(anomaly)
        if n % flush_every == 0:
            store.flush()
    store.flush()
    elapsed = time.perf_counter() - start
    store.close()
    return len(found) / elapsed


def ceiling(path: Path, found: list[Anomaly]) -> float:
    """The store's own statement and values, ``executemany`` in one transaction."""
    SqliteStore(path).close()  # the schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    statement = ("INSERT INTO anomalies (id, kind, trace_id, service, operation, event_time, detected_at, body, "
                 "incident_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                 "detected_at = excluded.detected_at, body = excluded.body, incident_id = excluded.incident_id")
    start = time.perf_counter()
    rows = [(a.id, a.kind.value, a.trace_id, a.service, a.operation, a.event_time, a.detected_at,
             a.model_dump_json(), a.incident_id) for a in found]
    db.execute("BEGIN")
    db.executemany(statement, rows)
    db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return len(found) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"ceiling": [], **{f"rows_per_flush_{n}": [] for n in FLUSH_EVERY}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = findings(tmp)
        for round_ in range(args.rounds):
            rates["ceiling"].append(ceiling(tmp / f"c{round_}.sqlite", found))
            for n in FLUSH_EVERY:
                rates[f"rows_per_flush_{n}"].append(through_store(tmp / f"s{n}-{round_}.sqlite", found, n))
    medians = {name: round(statistics.median(values)) for name, values in rates.items()}
    print(json.dumps({
        "benchmark": "store_writes", "rows": len(found), "rounds": args.rounds,
        "rows_per_second_median": medians,
        "us_per_row_median": {name: round(1e6 / rate, 1) for name, rate in medians.items()},
        "ratio_to_ceiling": {name: round(rate / medians["ceiling"], 3) for name, rate in medians.items()
                             if name != "ceiling"},
    }, indent=1))


if __name__ == "__main__":
    main()
