"""Which Kafka offsets may be committed: per partition, up to the oldest record
whose traces are not all decided yet.

A crash or a rebalance then re-reads from there instead of losing what was in
flight; deterministic finding ids make the repeated findings harmless. A
record waits for the trace ids it carries that were undecided when it was
read (a span record for its traces, a log record for the traces its logs
belong to); the pipeline's decisions release them. A log record whose trace
never comes is released when it expires (the log index's TTL), so one orphan
log cannot hold a partition's commits back for ever.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable


class _Partition:
    __slots__ = ("next_offset", "waiting", "records")

    def __init__(self) -> None:
        self.next_offset: int | None = None
        # offset → [traces still undecided, expiry or None, their ids]; insertion order is offset order.
        self.waiting: dict[int, list] = {}
        # (offset, trace ids) of every record past the last commit: what a new owner reads again.
        self.records: deque[tuple[int, tuple[bytes, ...]]] = deque()


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Partition] = {}
        self._waiters: dict[bytes, list[tuple[_Partition, int]]] = {}

    def track(self, partition: Hashable, offset: int, trace_ids: Iterable[bytes],
              undecided: Iterable[bytes], expires_at: int | None = None) -> None:
        """Records that ``offset`` was read; it waits until every id in ``undecided`` is released.

        Call it before the record's rows enter the pipeline: a trace decided on
        entry (an in-flight bound) must find its waiter already there.
        """
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition()
        part.next_offset = offset + 1
        part.records.append((offset, tuple(trace_ids)))
        undecided = set(undecided)
        if undecided:
            part.waiting[offset] = [len(undecided), expires_at, undecided]
            for trace_id in undecided:
                self._waiters.setdefault(trace_id, []).append((part, offset))

    def release(self, trace_id: bytes) -> None:
        """The trace is decided and its findings are in the sinks."""
        for part, offset in self._waiters.pop(trace_id, ()):
            entry = part.waiting.get(offset)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del part.waiting[offset]

    def expire(self, now: int) -> int:
        """Releases records whose expiry has passed; returns how many."""
        expired = 0
        for part in self._partitions.values():
            for offset, (_, expires_at, trace_ids) in list(part.waiting.items()):
                if expires_at is not None and expires_at <= now:
                    del part.waiting[offset]
                    self._unwait(part, trace_ids)
                    expired += 1
        return expired

    def _unwait(self, part: _Partition, trace_ids: Iterable[bytes]) -> None:
        for trace_id in trace_ids:
            waiters = self._waiters.get(trace_id)
            if waiters is not None:
                waiters[:] = [w for w in waiters if w[0] is not part]
                if not waiters:
                    del self._waiters[trace_id]

    def committable(self, partition: Hashable) -> int | None:
        """The offset to commit (the next record to read after a restart), or None if nothing was read."""
        part = self._partitions.get(partition)
        if part is None or part.next_offset is None:
            return None
        return next(iter(part.waiting), part.next_offset)

    def committed(self, partition: Hashable, offset: int) -> None:
        """Forgets the records before a committed offset."""
        part = self._partitions.get(partition)
        if part is not None:
            while part.records and part.records[0][0] < offset:
                part.records.popleft()

    def pending(self, partition: Hashable) -> int:
        """Records of the partition read but not yet committable."""
        part = self._partitions.get(partition)
        return len(part.waiting) if part is not None else 0

    def revoke(self, partition: Hashable) -> set[bytes]:
        """Drops the partition; returns the trace ids of its records past the
        commit point, which its next owner reads again."""
        part = self._partitions.pop(partition, None)
        if part is None:
            return set()
        start = next(iter(part.waiting), part.next_offset)
        trace_ids = {trace_id for offset, ids in part.records if start is None or offset >= start for trace_id in ids}
        self._unwait(part, {trace_id for entry in part.waiting.values() for trace_id in entry[2]})
        return trace_ids

    def partitions(self) -> list[Hashable]:
        return list(self._partitions)
