"""OffsetTracker: what may be committed, per partition, as traces are decided."""

from traceguard.sources.kafka_offsets import OffsetTracker

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def test_commit_point_trails_the_oldest_record_with_an_undecided_trace():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 10, [A], [A])
    tracker.track_spans("p0", 11, [B], [B])
    tracker.track_spans("p0", 12, [A], [A])
    assert tracker.committable("p0") == 10
    tracker.release(B)  # a younger trace decided first: still held by A at 10
    assert tracker.committable("p0") == 10
    tracker.release(A)
    assert tracker.committable("p0") == 13


def test_a_record_waits_for_all_its_traces():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 0, [A, B], [A, B])
    tracker.release(A)
    assert tracker.committable("p0") == 0
    tracker.release(B)
    assert tracker.committable("p0") == 1


def test_records_of_decided_traces_and_poison_records_do_not_hold_commits():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 5, [A], [])  # a late span: its trace was decided already
    tracker.track_done("p0", 6)  # poison
    assert tracker.committable("p0") == 7
    assert tracker.committable("other") is None


def test_partitions_are_independent():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 0, [A], [A])
    tracker.track_spans("p1", 0, [B], [B])
    tracker.release(B)
    assert (tracker.committable("p0"), tracker.committable("p1")) == (0, 1)


def test_an_orphan_log_record_is_released_at_its_expiry():
    tracker = OffsetTracker()
    tracker.track_logs("logs0", 3, [C], lambda t: False, expires_at=1_000)
    assert tracker.expire(999) == 0 and tracker.committable("logs0") == 3
    assert tracker.expire(1_000) == 1 and tracker.committable("logs0") == 4
    tracker.release(C)  # the trace comes after all: nothing left to release, no error


def test_revoke_returns_the_traces_a_new_owner_reads_again():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 0, [A], [A])
    tracker.track_spans("p0", 1, [B], [B])
    tracker.track_spans("p0", 2, [C], [C])
    tracker.release(A)
    tracker.committed("p0", tracker.committable("p0"))  # commits 1
    tracker.release(C)  # decided, but past the last commit: it will be read again
    assert tracker.revoke("p0") == {B, C}
    assert tracker.committable("p0") is None


def test_a_revoked_partition_read_again_is_counted_afresh():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 0, [A], [A])
    tracker.revoke("p0")
    tracker.track_spans("p0", 0, [A], [A])  # assigned again, read again from the commit point
    tracker.release(A)
    assert tracker.committable("p0") == 1


def test_a_log_record_is_held_until_its_trace_is_decided_and_committed():
    tracker = OffsetTracker()
    tracker.track_spans("spans", 0, [A], [A])
    tracker.track_logs("logs", 0, [A], lambda t: False, expires_at=None)
    tracker.release(A)
    assert tracker.committable("logs") == 0  # decided, but its spans may still be read again
    tracker.committed("spans", tracker.committable("spans"))
    assert tracker.committable("logs") == 1


def test_a_log_record_of_a_settled_trace_waits_for_nothing():
    tracker = OffsetTracker()
    tracker.track_spans("spans", 0, [A], [A])
    tracker.release(A)
    tracker.committed("spans", 1)
    tracker.track_logs("logs", 0, [A], lambda t: t == A, expires_at=None)
    assert tracker.committable("logs") == 1


def test_straddlers_are_decided_traces_on_both_sides_of_the_commit_point():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 0, [A], [A])
    tracker.track_spans("p0", 1, [B], [B])  # B begins: still undecided at the commit
    tracker.track_spans("p0", 2, [A], [A])  # A goes on after B began
    tracker.release(A)
    assert tracker.committable("p0") == 1
    assert tracker.straddlers("p0", 1) == {A: 2}
    tracker.committed("p0", 1)
    assert tracker.straddlers("p0", 1) == {A: 2}  # still, from the records left
    tracker.release(B)
    tracker.committed("p0", tracker.committable("p0"))
    assert tracker.straddlers("p0", 3) == {}


def test_recently_read_records_stay_uncommitted_for_the_late_horizon():
    tracker = OffsetTracker()
    tracker.track_spans("p0", 0, [A], [A], stamp=100)
    tracker.track_spans("p0", 1, [B], [B], stamp=200)
    tracker.release(A)
    tracker.release(B)
    assert tracker.committable("p0") == 2
    assert tracker.committable("p0", read_before=150) == 1  # B was read too recently
    assert tracker.committable("p0", read_before=100) == 0
    assert tracker.committable("p0", read_before=201) == 2
