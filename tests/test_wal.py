"""The write-ahead log of ``serve``: its file format, bounds and trimming, and
kill -9 of a real ``traceguard serve`` losing no acknowledged span."""

from __future__ import annotations

import os
import signal

import pytest

from benchmarks.serve_process import ServeProcess
from builders import sid, tid, traces_request
from traceguard.metrics import Metrics
from traceguard.sources.wal import Checkpoint, WalFull, WriteAheadLog


def wal(directory, **bounds) -> WriteAheadLog:
    settings = {"max_bytes": 1 << 20, "segment_bytes": 1 << 16, "fsync": True, **bounds}
    return WriteAheadLog(directory, metrics=Metrics(), **settings)


def append(log: WriteAheadLog, signal: str, encoding: str, body: bytes) -> int:
    return log.append(log.prepare(signal, encoding, body))


def bodies(log: WriteAheadLog, start: int = 0) -> list[tuple[int, str, str, bytes]]:
    return [(r.seq, r.signal, r.encoding, r.body) for r in log.replay(start)]


def test_records_come_back_in_order_across_segments_and_restarts(tmp_path):
    log = wal(tmp_path, segment_bytes=1 << 16)
    written = [(append(log, "traces" if n % 3 else "logs", "json" if n % 2 else "proto", bytes([n % 256]) * 5000), n)
               for n in range(40)]
    log.sync(written[-1][0])
    log.close()
    assert len(list(tmp_path.glob("*.seg"))) > 1
    again = wal(tmp_path)
    replayed = bodies(again)
    assert [seq for seq, *_ in replayed] == list(range(40))
    assert replayed[3] == (3, "logs", "json", bytes([3]) * 5000) and replayed[4][1:3] == ("traces", "proto")
    assert append(again, "traces", "proto", b"next") == 40  # numbering goes on after a restart


def test_a_torn_last_record_is_cut_off_and_a_corrupt_one_elsewhere_is_counted(tmp_path):
    log = wal(tmp_path, segment_bytes=1 << 16)
    for n in range(30):
        append(log, "traces", "proto", bytes([n]) * 5000)
    log.close()
    segments = sorted(tmp_path.glob("*.seg"))
    with open(segments[-1], "ab") as last:  # a crash in the middle of a write
        last.write(b"\x10\x00\x00\x00garbage")
    first = bytearray(segments[0].read_bytes())
    first[30 + 5017] ^= 0xFF  # a flipped byte in the second record's body
    segments[0].write_bytes(bytes(first))
    metrics = Metrics()
    again = WriteAheadLog(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16, fsync=True, metrics=metrics)
    seqs = [r.seq for r in again.replay(0)]
    assert seqs[0] == 0 and 1 not in seqs and seqs[-1] == 29  # the rest of the corrupt segment is skipped
    assert metrics.get("traceguard_wal_corrupt_records_total") == 1
    assert not segments[-1].read_bytes().endswith(b"garbage")


def test_the_bound_refuses_and_a_commit_trims_whole_segments(tmp_path):
    log = wal(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    with pytest.raises(WalFull):
        for n in range(1000):
            append(log, "traces", "proto", b"x" * 10_000)
    full = n
    assert full < 110
    assert log.commit(Checkpoint(full - 2, {tid(7): (full - 3, 123)})) > 0
    append(log, "traces", "proto", b"room again")
    log.close()
    again = wal(tmp_path)
    checkpoint = again.checkpoint()
    assert checkpoint == Checkpoint(full - 2, {tid(7): (full - 3, 123)})
    assert [seq for seq, *_ in bodies(again, checkpoint.seq)] == [full - 2, full - 1, full]


def _request(trace: int):
    """A root and a span whose parent never comes: one missing_parent finding per trace."""
    return traces_request(
        dict(trace_id=tid(trace), span_id=sid(1), name="GET /", kind=2, start_time_unix_nano=1_000,
             end_time_unix_nano=9_000),
        dict(trace_id=tid(trace), span_id=sid(2), parent_span_id=sid(99), name="child", start_time_unix_nano=2_000,
             end_time_unix_nano=8_000),
    )


def _post(server: ServeProcess, trace: int) -> None:
    import httpx

    response = httpx.post(f"http://127.0.0.1:{server.http}/v1/traces", content=_request(trace).SerializeToString(),
                          headers={"content-type": "application/x-protobuf"}, timeout=30)
    assert response.status_code == 200, response.text


def test_kill_9_then_restart_loses_no_acknowledged_span(tmp_path):
    """Acknowledged but undecided when killed: found after the restart, exactly once.
    Decided before the kill: not found again from the log's leftovers."""
    state = tmp_path / "state"
    server = ServeProcess(state, "--decision-wait", "1s", "--max-trace-age", "2s",
                          env={"TRACEGUARD_SERVE__WAL_COMMIT_INTERVAL": "50ms"})
    for trace in range(1, 6):
        _post(server, trace)
    server.wait_for(lambda: len({a["trace_id"] for a in server.anomalies()}) == 5, timeout=120,
                    what="the first five traces decided")
    server.stop()
    slow = ServeProcess(state, "--decision-wait", "600s", "--max-trace-age", "1200s")
    first = {a["id"] for a in slow.anomalies()}
    for trace in range(6, 11):
        _post(slow, trace)
    os.kill(slow.process.pid, signal.SIGKILL)
    slow.process.wait(30)
    slow.client.close()
    again = ServeProcess(state, "--decision-wait", "1s", "--max-trace-age", "2s")
    try:
        again.wait_for(lambda: len({a["trace_id"] for a in again.anomalies()}) == 10, timeout=120,
                       what="the five acknowledged before the kill, decided after the restart")
        found = again.anomalies()
        kinds = {n: sorted(a["kind"] for a in found if a["trace_id"] == tid(n).hex()) for n in range(1, 11)}
        assert all(kinds[n] == kinds[1] for n in kinds) and "missing_parent" in kinds[1], kinds
        assert first <= {a["id"] for a in found}
        assert any("write-ahead log: 5 requests" in line for line in again.lines)
    finally:
        assert again.stop() == 0


def test_a_disk_that_refuses_writes_refuses_exports_until_it_takes_them_again(tmp_path, monkeypatch):
    """ENOSPC: WalFull (the receivers answer 429 / RESOURCE_EXHAUSTED, reason wal_full),
    ``failing`` says why (``/readyz`` not ready); a probe or the next write that works clears it."""
    import errno

    import traceguard.sources.wal as wal_module

    log = wal(tmp_path)
    append(log, "traces", "proto", b"before")
    real_write = os.writev

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_module.os, "writev", full)
    with pytest.raises(WalFull, match="No space left"):
        append(log, "traces", "proto", b"refused")
    assert log.failing is not None and "No space" in log.failing
    monkeypatch.setattr(wal_module.os, "write", lambda fd, data: full(fd, [data]))
    assert not log.probe() and "No space" in log.failing  # the ticker's probe: still full
    monkeypatch.undo()
    assert log.probe() and log.failing is None  # space again: ready without waiting for a request
    monkeypatch.setattr(wal_module.os, "writev", real_write)
    assert append(log, "traces", "proto", b"after") == 1 and log.failing is None
    log.close()
    assert [body for *_, body in bodies(wal(tmp_path))] == [b"before", b"after"]


def _learned_traces(state) -> dict:
    """Traces learned per root operation in the state dir's model snapshot."""
    from traceguard.config import PipelineConfig
    from traceguard.models import store

    models = store.load(state / "models", PipelineConfig().learned)
    return {key: root.traces for key, root in models.structure.roots_.items()}


def test_kill_9_loses_nothing_learned_since_the_last_snapshot(tmp_path):
    """The snapshot records the log position it covers and the log is kept from
    there: after kill -9 and a restart, what was learned from the traces decided
    since the snapshot is learned again, once: the same as without the kill."""
    import httpx

    from benchmarks.common import scenario_requests

    bodies = [r.SerializeToString() for r in scenario_requests(600, request_spans=256)]
    args = ("--decision-wait", "1s", "--max-trace-age", "2s")
    env = {"TRACEGUARD_SERVE__WAL_COMMIT_INTERVAL": "50ms"}  # snapshots: at start and at stop only (5 min)

    def send(server, part):
        for body in part:
            httpx.post(f"http://127.0.0.1:{server.http}/v1/traces", content=body, timeout=60,
                       headers={"content-type": "application/x-protobuf"}).raise_for_status()

    def decided(server):
        return server.metric("traceguard_traces_decided_total")

    traces = 600
    reference = ServeProcess(tmp_path / "reference", *args, env=env)
    try:
        send(reference, bodies)
        reference.wait_for(lambda: decided(reference) >= traces, timeout=300, what="every trace decided")
    finally:
        assert reference.stop(timeout=120) == 0

    killed = ServeProcess(tmp_path / "killed", *args, env=env)
    try:
        send(killed, bodies[: len(bodies) // 2])
        killed.wait_for(lambda: decided(killed) >= 250, timeout=300, what="most of the first half decided")
    finally:  # decided and learned since the start-up snapshot: in the log only
        os.kill(killed.process.pid, signal.SIGKILL)
        killed.process.wait(30)
        killed.client.close()
    again = ServeProcess(tmp_path / "killed", *args, env=env)
    try:
        send(again, bodies[len(bodies) // 2:])
        again.wait_for(lambda: decided(again) >= traces, timeout=300, what="every trace decided after the restart")
    finally:
        assert again.stop(timeout=120) == 0
    assert _learned_traces(tmp_path / "killed") == _learned_traces(tmp_path / "reference")
