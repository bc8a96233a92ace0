"""Which Kafka offsets may be committed, and what a re-reader must be told.

Per partition, offsets are committed up to the oldest record whose traces are
not all decided yet: a crash or a rebalance re-reads from there instead of
losing what was in flight, and deterministic finding ids make the repeated
findings harmless.

Two things keep the re-read findings the same as the first ones:

* A trace whose records lie on both sides of a commit point ("straddler":
  decided, but a record of it was read after the oldest undecided trace
  began, a late span for one) would be re-assembled from its later records
  only. The commit
  carries, in its metadata, each straddler's last offset read and decision
  time; whoever reads the partition next skips those records and treats later
  ones as late spans.
* A log record is held (not committed) until every trace it belongs to is
  decided and all of that trace's span records are committed, so a trace that
  is decided again after a re-read gets the same logs linked. A log record
  whose trace never comes is released at its expiry (the log index's TTL).
"""

from __future__ import annotations

from collections import _count_elements, deque  # type: ignore[attr-defined]
from typing import Callable, Hashable, Iterable


class _Partition:
    __slots__ = ("next_offset", "waiting", "records", "last_offset", "straddlers")

    def __init__(self) -> None:
        self.next_offset: int | None = None
        # offset → [traces still awaited, expiry or None, their ids, this partition, offset]; insertion
        # order is offset order.
        self.waiting: dict[int, list] = {}
        # (offset, trace ids, read at) of every record past the last commit: what a new owner reads again.
        self.records: deque[tuple[int, tuple[bytes, ...], int]] = deque()
        self.last_offset: dict[bytes, int] = {}  # trace → its last record's offset, for traces in `records`
        self.straddlers: set[bytes] = set()


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Partition] = {}
        # trace → the waiting entry of the record that awaits it, or a tuple of them
        # (one entry held directly: no container per trace for the garbage collector
        # to walk, and a live receiver tracks every request's traces)
        self._decision_waiters: dict[bytes, list | tuple[list, ...]] = {}
        self._settle_waiters: dict[bytes, list | tuple[list, ...]] = {}
        self._open: dict[bytes, int] = {}  # trace → its span records not yet committed

    def _part(self, partition: Hashable) -> _Partition:
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition()
        return part

    def track_spans(self, partition: Hashable, offset: int, trace_ids: Iterable[bytes],
                    undecided: Iterable[bytes], stamp: int = 0) -> None:
        """A span record was read; it waits until every trace in ``undecided`` is decided.

        Call it before the rows enter the pipeline: a trace decided on entry (an
        in-flight bound) must find its waiter already there.
        """
        part = self._part(partition)
        trace_ids = tuple(trace_ids)
        undecided = set(undecided)
        self._add(part, offset, trace_ids, undecided, None, self._decision_waiters, stamp)
        _count_elements(self._open, trace_ids)  # one more uncommitted record of each (a loop in C)
        part.last_offset.update(dict.fromkeys(trace_ids, offset))
        if len(undecided) < len(trace_ids):  # late spans: their traces were decided from earlier records
            part.straddlers.update(set(trace_ids) - undecided)

    def track_logs(self, partition: Hashable, offset: int, trace_ids: Iterable[bytes],
                   is_decided: Callable[[bytes], bool], expires_at: int | None, stamp: int = 0) -> None:
        """A log record was read; it waits until its traces are settled (decided, span records committed)."""
        trace_ids = tuple(trace_ids)
        unsettled = {t for t in trace_ids if t in self._open or not is_decided(t)}
        self._add(self._part(partition), offset, (), unsettled, expires_at, self._settle_waiters, stamp)

    def track_record(self, partition: Hashable, offset: int, signal: str, trace_ids: set[bytes],
                     assembler, now: int, log_ttl: int) -> None:
        """``track_spans`` or ``track_logs`` for a decoded record of ``signal``, read at ``now``
        (``assembler`` says which traces are decided; a log waits at most ``log_ttl``)."""
        if signal == "traces":
            self.track_spans(partition, offset, trace_ids, assembler.undecided(trace_ids), now)
        else:
            self.track_logs(partition, offset, trace_ids, assembler.is_decided, now + log_ttl, now)

    def track_done(self, partition: Hashable, offset: int, stamp: int = 0) -> None:
        """A record that waits for nothing (poison, or rows already accounted for)."""
        self._add(self._part(partition), offset, (), set(), None, self._decision_waiters, stamp)

    def _add(self, part: _Partition, offset: int, trace_ids: tuple, awaited: set, expires_at: int | None,
             waiters: dict, stamp: int) -> None:
        part.next_offset = offset + 1
        part.records.append((offset, trace_ids, stamp))
        if awaited:
            # [traces still awaited, expiry or None, their ids, partition, offset]
            entry = part.waiting[offset] = [len(awaited), expires_at, awaited, part, offset]
            for trace_id in awaited:
                held = waiters.get(trace_id)
                waiters[trace_id] = entry if held is None else (*_entries(held), entry)

    def release(self, trace_id: bytes) -> None:
        """The trace is decided and its findings are in the sinks."""
        self._wake(self._decision_waiters.pop(trace_id, None))
        if trace_id not in self._open:  # no span record of it is uncommitted (e.g. never read here)
            self._wake(self._settle_waiters.pop(trace_id, None))

    @staticmethod
    def _wake(held) -> None:
        for entry in _entries(held):
            entry[0] -= 1
            if entry[0] <= 0:
                entry[3].waiting.pop(entry[4], None)

    def expire(self, now: int) -> int:
        """Releases records whose expiry has passed; returns how many."""
        expired = 0
        for part in self._partitions.values():
            for offset, (_, expires_at, trace_ids, _, _) in list(part.waiting.items()):
                if expires_at is not None and expires_at <= now:
                    del part.waiting[offset]
                    self._unwait(part, trace_ids)
                    expired += 1
        return expired

    def _unwait(self, part: _Partition, trace_ids: Iterable[bytes]) -> None:
        for waiters in (self._decision_waiters, self._settle_waiters):
            for trace_id in trace_ids:
                held = waiters.get(trace_id)
                if held is not None:
                    kept = tuple(entry for entry in _entries(held) if entry[3] is not part)
                    if not kept:
                        del waiters[trace_id]
                    else:
                        waiters[trace_id] = kept[0] if len(kept) == 1 else kept

    def committable(self, partition: Hashable, read_before: int | None = None) -> int | None:
        """The offset to commit (the next record to read after a restart), or None if nothing was read.

        ``read_before``: also keep records read at or after this stamp uncommitted,
        so that a re-reader re-assembles recently decided traces and knows their
        late spans as late.
        """
        part = self._partitions.get(partition)
        if part is None or part.next_offset is None:
            return None
        offset = next(iter(part.waiting), part.next_offset)
        if read_before is not None:
            for record_offset, _, stamp in part.records:
                if record_offset >= offset or stamp >= read_before:
                    return min(offset, record_offset)
        return offset

    def straddlers(self, partition: Hashable, offset: int) -> dict[bytes, int]:
        """Decided traces with records on both sides of ``offset``: trace → its last offset read."""
        after = self.read_since(partition, offset)
        if not after:
            return {}
        part = self._partitions[partition]
        before = {t for o, ids, _ in part.records if o < offset for t in ids}
        return {t: last for t, last in after.items() if t in before or t in part.straddlers}

    def read_since(self, partition: Hashable, offset: int) -> dict[bytes, int]:
        """The traces with records at or after ``offset`` (not committed yet): trace → its last offset read."""
        part = self._partitions.get(partition)
        if part is None:
            return {}
        return {t: part.last_offset[t] for o, ids, _ in part.records if o >= offset for t in ids}

    def committed(self, partition: Hashable, offset: int) -> None:
        """Forgets the records before a committed offset; settles traces whose span records are all committed."""
        part = self._partitions.get(partition)
        if part is None:
            return
        while part.records and part.records[0][0] < offset:
            _, trace_ids, _ = part.records.popleft()
            for trace_id in trace_ids:
                left = self._open[trace_id] - 1
                if left:
                    self._open[trace_id] = left
                    part.straddlers.add(trace_id)
                    continue
                del self._open[trace_id]
                part.last_offset.pop(trace_id, None)
                part.straddlers.discard(trace_id)
                if trace_id not in self._decision_waiters:
                    self._wake(self._settle_waiters.pop(trace_id, None))

    def revoke(self, partition: Hashable) -> set[bytes]:
        """Drops the partition; returns the trace ids of its records past the last
        commit (call ``committed`` first), which its next owner reads again."""
        part = self._partitions.pop(partition, None)
        if part is None:
            return set()
        trace_ids = set()
        for _, ids, _ in part.records:  # every record kept is past the last commit
            for trace_id in ids:
                left = self._open.get(trace_id, 1) - 1
                if left > 0:
                    self._open[trace_id] = left
                else:
                    self._open.pop(trace_id, None)
                trace_ids.add(trace_id)
        self._unwait(part, {trace_id for entry in part.waiting.values() for trace_id in entry[2]})
        return trace_ids

    def pending(self, partition: Hashable) -> int:
        """Records of the partition read but not yet committable."""
        part = self._partitions.get(partition)
        return len(part.waiting) if part is not None else 0


def _entries(held) -> tuple:
    """The waiting entries a waiters value holds (see OffsetTracker._decision_waiters)."""
    if held is None:
        return ()
    return held if type(held) is tuple else (held,)


def after_straddlers(rows: list, last_read: dict[bytes, int], offset: int) -> list:
    """The rows of record ``offset`` that are not of a straddler (see ``straddlers``) the
    previous reader decided from this record or a later one: those were done."""
    return [row for row in rows if last_read.get(row.trace_id, -1) < offset]
