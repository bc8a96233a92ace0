"""The write-ahead log of ``serve``: no acknowledged span is lost to a crash.

Every accepted export request is appended (as it came, decompressed) before
the receiver answers, and replayed on the next start. What makes it safe to
drop is the Kafka source's rule (``kafka_offsets``): the log is trimmed up to
the oldest record whose traces are not all decided with their findings in the
store, and a checkpoint file says where that is and which decided traces
straddle it, so a replay skips their earlier records and knows their later
spans as late, exactly as a Kafka re-reader does. ``serve`` keeps the log
further back, from the position its last model snapshot covers (the same
kind of checkpoint, saved with the models), and replays from there.

On disk: ``wal/<first sequence number>.seg`` segment files of records
``<length u32><crc32 u32><seq u64><kind u8><body>`` (little-endian; the crc
covers kind and body, computed before the pipeline lock is taken; sequence
numbers must rise), and ``wal/checkpoint.json``. A record is written
with one ``write`` before the answer, so a killed process loses nothing the
kernel has (the Collector's file_storage does the same by default); with
``serve.wal_fsync`` the answer also waits for ``fsync``, shared by the
requests that wait together (group commit), so a power loss loses nothing
either. A torn record at the end of the last segment (the crash
came mid-write, before any answer) ends the replay there; a corrupt record
anywhere else ends its segment and is counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from traceguard.metrics import Metrics
from traceguard.models.store import write_atomically

log = logging.getLogger("traceguard.wal")

_HEADER = struct.Struct("<IIQB")
# (signal, encoding) of a record's body
KINDS = (("traces", "proto"), ("traces", "json"), ("logs", "proto"), ("logs", "json"))
_KIND = {pair: index for index, pair in enumerate(KINDS)}
CHECKPOINT = "checkpoint.json"


class WalFull(Exception):
    """The log is at ``serve.wal_max_bytes`` (or the disk refused the write): nothing more is accepted."""


@dataclass(frozen=True)
class Record:
    seq: int
    signal: str
    encoding: str
    body: bytes


@dataclass(frozen=True)
class Checkpoint:
    """Where a replay starts, and the decided traces straddling that point:
    trace id → (sequence number of its last record, decision time)."""

    seq: int
    straddlers: dict[bytes, tuple[int, int]]

    def to_json(self) -> bytes:
        entries = [[t.hex(), last, at] for t, (last, at) in self.straddlers.items()]
        return json.dumps({"seq": self.seq, "straddlers": entries}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Checkpoint":
        """Raises:
            ValueError, TypeError, KeyError: not what ``to_json`` writes.
        """
        document = json.loads(data)
        return cls(int(document["seq"]), {bytes.fromhex(t): (int(last), int(at))
                                          for t, last, at in document["straddlers"]})


class WriteAheadLog:
    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int, fsync: bool, metrics: Metrics) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._max_bytes, self._segment_bytes, self._fsync = max_bytes, segment_bytes, fsync
        self._metrics = metrics
        self._lock = threading.Lock()        # appends, segment changes
        self._sync_lock = threading.Lock()   # one fsync at a time; the others wait for it
        self._segments: dict[int, int] = {}  # first seq → size, for every segment on disk
        for path in directory.glob("*.seg"):
            if path.stem.isdigit():
                self._segments[int(path.stem)] = path.stat().st_size
        self.next_seq = 0
        self._fd: int | None = None
        self._current: int | None = None
        self._written = self._synced = -1
        self.failing: str | None = None  # the last write's error, until a write succeeds
        metrics.gauge("traceguard_wal_bytes", lambda: self.size)
        metrics.gauge("traceguard_wal_segments", lambda: len(self._segments))

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return sum(self._segments.values())

    # -- reading (at start, before anything is appended) ------------------------------
    def checkpoint(self) -> Checkpoint:
        path = self.directory / CHECKPOINT
        if not path.exists():
            return Checkpoint(0, {})
        try:
            return Checkpoint.from_json(path.read_bytes())
        except (ValueError, TypeError, KeyError) as exc:  # written atomically, so only tampering gets here
            log.error("%s is unreadable (%s): the whole log is replayed", path, exc)
            return Checkpoint(0, {})

    def replay(self, start: int) -> Iterator[Record]:
        """The records from ``start`` on, in order; afterwards appends continue past the last."""
        firsts = sorted(self._segments)
        for index, first in enumerate(firsts):
            last_segment = index == len(firsts) - 1
            if not last_segment and firsts[index + 1] <= start:
                continue  # wholly before the checkpoint (trimming lags a little)
            yield from self._read_segment(first, start, last_segment)
        self.next_seq = max(self.next_seq, start)

    def _read_segment(self, first: int, start: int, last_segment: bool) -> Iterator[Record]:
        path = self._path(first)
        data = path.read_bytes()
        at = 0
        while at < len(data):
            problem = None
            if len(data) - at < _HEADER.size:
                problem = "a torn record header"
            else:
                length, crc, seq, kind = _HEADER.unpack_from(data, at)
                body_at = at + _HEADER.size
                if body_at + length > len(data):
                    problem = "a torn record"
                elif zlib.crc32(data[body_at - 1:body_at + length]) != crc or kind >= len(KINDS) or seq < self.next_seq:
                    problem = "a corrupt record"
            if problem is not None:
                if last_segment:  # the crash came mid-write: nothing of it was acknowledged
                    log.warning("%s ends in %s at byte %d (a write cut short): cut there", path, problem, at)
                    os.truncate(path, at)
                    self._segments[first] = at
                else:
                    self._metrics.inc("traceguard_wal_corrupt_records_total")
                    log.error("%s: %s at byte %d; the rest of this segment is skipped", path, problem, at)
                return
            self.next_seq = seq + 1
            at = body_at + length
            if seq >= start:
                yield Record(seq, *KINDS[kind], data[body_at:at])

    # -- appending -------------------------------------------------------------------
    @staticmethod
    def prepare(signal: str, encoding: str, body: bytes) -> tuple[int, int, bytes]:
        """The record's kind and checksum, worked out before the pipeline lock is taken."""
        kind = _KIND[(signal, encoding)]
        return kind, zlib.crc32(body, zlib.crc32(bytes((kind,)))), body

    def append(self, prepared: tuple[int, int, bytes]) -> int:
        """Writes one accepted request (``prepare``'s); returns its sequence number.

        Raises:
            WalFull: at ``max_bytes``, or the disk refused the write.
        """
        kind, crc, body = prepared
        size = _HEADER.size + len(body)
        with self._lock:
            if sum(self._segments.values()) + size > self._max_bytes:
                raise WalFull(f"the write-ahead log is at serve.wal_max_bytes ({self._max_bytes} bytes)")
            seq = self.next_seq
            try:
                if self._fd is None or self._segments[self._current] + size > self._segment_bytes:
                    self._roll(seq)
                written = os.writev(self._fd, (_HEADER.pack(len(body), crc, seq, kind), body))
                if written != size:
                    raise OSError(f"short write ({written} of {size} bytes)")
            except OSError as exc:
                self._metrics.inc("traceguard_wal_write_errors_total")
                self._abandon_segment()
                self.failing = str(exc)
                raise WalFull(f"the write-ahead log cannot write: {exc}") from None
            self.failing = None
            self._segments[self._current] += size
            self.next_seq = seq + 1
            self._written = seq
        self._metrics.inc("traceguard_wal_records_total")
        return seq

    def probe(self) -> bool:
        """While writes fail: whether the disk takes one again (a page written, synced
        and removed), and if so ``failing`` is cleared. Without it a full disk would
        leave the process not ready for good: not ready, it gets no requests to
        find out with (Kubernetes takes it out of the Service)."""
        if self.failing is None:
            return True
        path = self.directory / "probe.tmp"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(4096))
                os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            self.failing = str(exc)
            return False
        self.failing = None
        return True

    def sync(self, seq: int) -> None:
        """Returns once record ``seq`` is on disk (with ``fsync`` on): one fsync covers
        every record written before it, so concurrent requests share it."""
        if not self._fsync:
            return
        with self._sync_lock:
            if self._synced >= seq:
                return
            with self._lock:
                fd, target = self._fd, self._written
            if fd is not None:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    self._metrics.inc("traceguard_wal_write_errors_total")
                    raise WalFull(f"the write-ahead log cannot sync: {exc}") from None
            self._synced = target
            self._metrics.inc("traceguard_wal_syncs_total")

    def _roll(self, seq: int) -> None:
        """A new segment from ``seq`` on (the one before is synced first: its records may not be yet)."""
        if self._fd is not None:
            if self._fsync:
                os.fsync(self._fd)
            os.close(self._fd)
        self._fd = os.open(self._path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._current = seq
        self._segments[seq] = os.fstat(self._fd).st_size
        if self._fsync:  # the new file's name must survive a power loss too
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _abandon_segment(self) -> None:
        """After a failed write the segment may end in a partial record: the next
        append starts a new one, and a replay cuts the partial one off."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    # -- trimming --------------------------------------------------------------------
    def commit(self, checkpoint: Checkpoint, keep_from: int | None = None) -> int:
        """Records the new replay start, then deletes the segments wholly before it and
        before ``keep_from`` (the position the last model snapshot covers); returns how many."""
        write_atomically(self.directory / CHECKPOINT, checkpoint.to_json())
        with self._lock:
            firsts = sorted(self._segments)
            keep = checkpoint.seq if keep_from is None else min(checkpoint.seq, keep_from)
            dropped = [first for first, following in zip(firsts, firsts[1:]) if following <= keep]
            for first in dropped:
                self._path(first).unlink(missing_ok=True)
                del self._segments[first]
        return len(dropped)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                if self._fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def _path(self, first: int) -> Path:
        return self.directory / f"{first:020d}.seg"
