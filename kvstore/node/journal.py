"""The node's Raft log on disk, replacing PySyncObj's ``FileJournal``: checksummed records, a
torn tail dropped at start-up, and entries forgotten only after the snapshot that covers them is
on disk.

PySyncObj's journal (``pysyncobj/journal.py``) is an mmap that is never flushed (D3), cannot be
opened when empty (D10), has no record checksums (a torn or zero-filled tail is read as entries,
or raises), rewrites itself in place on compaction, and drops its whole tail when the snapshot
was renamed into place but the journal not yet compacted (D12, below). This one keeps the same
interface (PySyncObj calls it exactly as it calls its own) on a plain file written with
``pwrite``; ``kvstore.node.journal_hook`` puts it in PySyncObj's place.

File format (``raft.journal``; little-endian)::

    MAGIC (16 bytes: b"KVJOURNAL1\\n" and five zero bytes)
    record*:  u32 payload length | u32 crc32 | u64 index | u64 term | payload

The crc32 (zlib's) covers the length, index, term and payload. Indexes are consecutive and
terms never decrease. The payload is PySyncObj's command bytes, unchanged.

Rules, each in one place below:

* **Durable before acknowledged** is the caller's business (``kvstore.node.durable`` and
  ``kvstore.node.sync_thread`` send an acknowledgement only once ``synced_index`` covers it);
  ``sync`` is one ``fdatasync`` of everything appended. ``sync_point`` and
  ``synced_in_background`` do the same from another thread: that thread syncs a duplicate of
  the descriptor, and the index it covered counts only if no entry was dropped meanwhile
  (``_epoch``): entries written again at the same indexes need a sync of their own.
* **A torn tail is dropped, corruption is refused** (``_scan``): the first record that does not
  check out ends the log if it is the last thing in the file (cut short, zero-filled, or a last
  record whose checksum fails: a write the power interrupted, never acknowledged in durable
  mode); if a valid record follows it, the disk is damaged and the node refuses to start.
* **Forget only what a durable snapshot covers**: before ``clear`` and ``deleteEntriesTo`` drop
  entries from the file, the snapshot file (which PySyncObj has just renamed into place) and the
  directory are fsynced; the compacted journal is written to a temporary file, fsynced and
  renamed, never rewritten in place.
* **Compaction costs the tick thread no I/O** (with a sync thread, ``reclaim_later``):
  ``deleteEntriesTo`` drops the entries from the list PySyncObj indexes at once, and the file
  keeps them as a dead prefix (a crash then leaves the case ``align_to_snapshot`` repairs).
  ``reclaim`` copies the live part aside on the sync thread; from the moment the copy has caught
  up, every append, truncation and sync goes to both files (``_files``, each with the shift from
  the journal's offsets to its own), so whichever file holds the name after a crash holds every
  entry that was synced. The copy is fsynced before it is renamed over the journal, and the old
  file is let go only once the rename is durable.
* **Fail-stop**: the first failed write, truncation or fsync poisons the journal: that call and
  every later one raise ``JournalFailed`` (after a failed fsync, the kernel may have dropped the
  dirty pages: retrying would report success for data that is gone), and ``on_failure`` tells
  the node, which stops.

Term, vote and commit index live in ``kvstore.node.meta_file`` (PySyncObj's journal interface
carries them, so this class forwards to it).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from kvstore.node.meta_file import Meta, MetaFile

log = logging.getLogger("kvstore.node.journal")

MAGIC = b"KVJOURNAL1\n\0\0\0\0\0"
RECORD = struct.Struct("<IIQQ")
"""payload length, crc32, index, term."""
_CRC_FIELDS = struct.Struct("<IQQ")
MAX_PAYLOAD = 1 << 30

Entry = tuple[bytes, int, int]
"""(command, index, term), as PySyncObj keeps them."""


class SyncPoint:
    """A sync asked for on the tick thread (``Journal.sync_point``): duplicates of the
    journal's descriptors (two while a compaction copy is mirrored), and the entries a
    ``fdatasync`` of them covers."""

    def __init__(self, fds: list[int], epoch: int, index: int) -> None:
        self.fds, self.epoch, self.index = fds, epoch, index

    def close(self) -> None:
        fds, self.fds = self.fds, []
        close_all(fds)


class JournalFailed(OSError):
    """A write, truncation or fsync of the journal failed: the node must stop (fail-stop)."""


class JournalCorrupt(Exception):
    """The journal is damaged in a way that is not a torn tail: the node cannot trust it."""


def crc(index: int, term: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_FIELDS.pack(len(payload), index, term)))


def encode(index: int, term: int, payload: bytes) -> bytes:
    return RECORD.pack(len(payload), crc(index, term, payload), index, term) + payload


def close_all(fds: Iterable[int]) -> None:
    """Closes every descriptor, even after closing one failed: on Linux a close that fails
    (EIO from a dead disk) still frees its descriptor, and the rest must not stay open. A
    failure is raised once all are closed."""
    failure: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            failure = exc
    if failure is not None:
        raise failure


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Scan:
    """What ``_scan`` found in a journal's bytes."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.offsets: list[int] = []
        self.end = len(MAGIC)
        """Where the valid records end (the file is cut here if it is longer)."""
        self.problem = ""
        """Why the records stop before the end of the file ("" if they do not)."""


def _scan(data: bytes, name: str) -> Scan:
    """The valid records of ``data`` (which starts with MAGIC); raises ``JournalCorrupt`` when
    a bad record is followed by a good one."""
    scan = Scan()
    offset, size = len(MAGIC), len(data)
    while offset < size:
        problem, length = _check(data, offset, scan.entries[-1] if scan.entries else None)
        if problem:
            after = offset + RECORD.size + length
            if (problem == "checksum" and after < size
                    and not _check(data, after, None)[0]):
                raise JournalCorrupt(
                    f"{name}: the record at offset {offset} fails its checksum but a valid "
                    f"record follows it: the disk is damaged, not a write cut short")
            if problem == "out of order":
                raise JournalCorrupt(f"{name}: the record at offset {offset} is valid but out "
                                     "of order (its index or term does not follow)")
            scan.problem = problem
            break
        _length, _crc, index, term = RECORD.unpack_from(data, offset)
        start = offset + RECORD.size
        scan.entries.append((data[start:start + length], index, term))
        scan.offsets.append(offset)
        offset = start + length
    scan.end = offset
    return scan


def _check(data: bytes, offset: int, previous: Entry | None) -> tuple[str, int]:
    """("", payload length) for a valid record at ``offset``, else (the problem, length)."""
    if len(data) - offset < RECORD.size:
        return "cut short", 0
    length, checksum, index, term = RECORD.unpack_from(data, offset)
    if length > MAX_PAYLOAD or offset + RECORD.size + length > len(data):
        return "cut short", 0
    payload = data[offset + RECORD.size:offset + RECORD.size + length]
    if checksum != crc(index, term, payload):
        return "checksum", length
    if previous is not None and (index != previous[1] + 1 or term < previous[2]):
        return "out of order", length
    return "", length


class Journal:
    """PySyncObj's journal interface on a checksummed file. The tick thread owns it; only
    ``synced_in_background`` runs on another thread (``kvstore.node.sync_thread``)."""

    def __init__(self, path: str, meta: MetaFile, snapshot_path: str,
                 entries: list[Entry], offsets: list[int], end: int) -> None:
        self.path = path
        self.meta_file = meta
        self.meta: Meta = meta.load_or_default()
        self.snapshot_path = snapshot_path
        self.directory = os.path.dirname(path) or "."
        self._entries = entries
        self._offsets = offsets
        """Where each entry starts, in the journal's own offsets: a file's offset is this less
        its shift (``_files``)."""
        self._end = end
        self._files: list[tuple[int, int]] = [(os.open(path, os.O_RDWR), 0)]
        """(descriptor, shift) of each file written: the journal, and while ``reclaim`` mirrors
        it, the copy that will replace it."""
        self._dirty = False
        self.synced_index = entries[-1][1] if entries else 0
        """The last index known to be on disk (``sync`` moves it)."""
        self._epoch = 0
        """Counts truncations and rewrites: a background sync asked for before one does not
        cover the entries written after it."""
        self._lock = threading.Lock()
        """Guards ``synced_index``, ``_epoch``, the entries and ``_files`` against the sync
        thread."""
        self._meta_lock = threading.Lock()
        """One meta store at a time, each of the meta as it is then (never an older one)."""
        self.store_meta_later: Callable[[], None] | None = None
        """Set by ``kvstore.node.sync_thread``: the periodic store of the commit index runs on
        its thread, not the tick thread (a term or vote is always stored at once)."""
        self.reclaim_later: Callable[[], None] | None = None
        """Set by ``kvstore.node.sync_thread``: it runs ``reclaim`` after a compaction, which
        then only drops entries from the list; without it, the file is compacted at once."""
        self.failed: str | None = None
        self.on_failure: Callable[[str], None] = lambda reason: None
        self.io_seconds = 0.0
        """Time in fdatasync, meta stores and compaction, by ``io_clock``."""
        self.io_clock: Callable[[], float] = time.perf_counter
        """What times them: wall time, or (``kvstore.node.gap_causes``) wall time less the
        calling thread's waits for a core."""

    # -- creating and opening -------------------------------------------------------------

    @staticmethod
    def create(path: str) -> None:
        """A new, empty journal, durable (file and name) before anything is appended."""
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path) or ".")

    @classmethod
    def open(cls, path: str, meta: MetaFile, snapshot_path: str) -> Journal:
        """Opens ``path`` (which starts with MAGIC), cutting a torn tail off it."""
        with open(path, "rb") as f:
            data = f.read()
        scan = _scan(data, os.path.basename(path))
        if scan.end < len(data):
            log.warning("%s: dropped %d bytes after entry %s (%s): a write the power cut short",
                        path, len(data) - scan.end,
                        scan.entries[-1][1] if scan.entries else "none", scan.problem)
            with open(path, "r+b") as f:
                f.truncate(scan.end)
                f.flush()
                os.fsync(f.fileno())
        return cls(path, meta, snapshot_path, scan.entries, scan.offsets, scan.end)

    # -- what PySyncObj calls -------------------------------------------------------------

    def add(self, command: Any, idx: int, term: int) -> None:
        payload = command if isinstance(command, bytes) else bytes(command)
        record = encode(idx, term, payload)
        with self._lock:
            for fd, shift in self._files:
                self._io("write", os.pwrite, fd, record, self._end - shift)
            self._entries.append((payload, idx, term))
            self._offsets.append(self._end)
            self._end += len(record)
        self._dirty = True

    def clear(self) -> None:
        """Forgets every entry: PySyncObj does this right after loading a snapshot."""
        self._snapshot_durable()
        self._truncate(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 - PySyncObj's name
        """Drops the entries from position ``entryFrom`` on (a conflict with the leader)."""
        if entryFrom < len(self._entries):
            self._truncate(entryFrom)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        """Drops the entries before position ``entryTo``: the snapshot covers them."""
        if entryTo <= 0:
            return
        if self.reclaim_later is not None:
            with self._lock:
                del self._entries[:entryTo]
                del self._offsets[:entryTo]
            self.reclaim_later()
            return
        t0 = self.io_clock()
        self._snapshot_durable()
        self._rewrite(self._entries[entryTo:])
        took = self.io_clock() - t0
        self.io_seconds += took
        # Log text only: nothing reads it back (mutants of it are unobservable).
        log.info("compacted: %d entries kept, in %.0f ms",  # pragma: no mutate
                 len(self._entries), took * 1e3)  # pragma: no mutate

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        """A clean stop: everything durable, then closed."""
        if not self._files:
            return
        try:
            if not self.failed:
                self.sync()
                self.store_meta()
        finally:
            with self._lock:
                files, self._files = self._files, []
            close_all(fd for fd, _shift in files)

    def flush(self) -> None:
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802
        self.meta = self.meta.with_commit(raftCommitIndex)

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self.meta.commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802
        """Term and vote are durable (file and directory) before this returns, so before any
        message that reflects them is sent (Raft's Figure 3.1)."""
        self.meta = self.meta.with_term(term, votedForNodeId)
        self.store_meta()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self.meta.term

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self.meta.voted_for

    def onOneSecondTimer(self) -> None:  # noqa: N802
        """Stores a new commit index now and then; it never runs ahead of the durable log."""
        if self.meta_file.stored != self._capped(self.meta):
            if self.store_meta_later is not None:
                self.store_meta_later()
            else:
                self.store_meta()

    # -- ours -----------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Something was appended or truncated since the last ``sync``."""
        return self._dirty

    def sync(self) -> None:
        """Makes every entry durable (one fdatasync of each file written)."""
        self._check()
        t0 = self.io_clock()
        with self._lock:
            for fd, _shift in self._files:
                self._io("fdatasync", os.fdatasync, fd)
        self.io_seconds += self.io_clock() - t0
        self._dirty = False
        with self._lock:
            self.synced_index = self._last_index()

    def sync_point(self) -> SyncPoint | None:
        """On the tick thread: a sync of everything appended so far, for another thread to
        run (``synced_in_background``); None if nothing was appended since the last one."""
        if not self._dirty:
            return None
        self._check()
        with self._lock:
            point = SyncPoint([self._io("dup", os.dup, fd) for fd, _shift in self._files],
                              self._epoch, self._last_index())
        self._dirty = False
        return point

    def synced_in_background(self, point: SyncPoint) -> None:
        """On the sync thread: ``fdatasync``, then ``synced_index`` moves to what it covered,
        unless entries were dropped since ``point`` was taken."""
        try:
            self._check()
            try:
                for fd in point.fds:
                    os.fdatasync(fd)
            except OSError as exc:
                self._fail(f"fdatasync on {self.path} failed: {exc}", exc)
        finally:
            point.close()
        with self._lock:
            if point.epoch == self._epoch and point.index > self.synced_index:
                self.synced_index = point.index

    def _last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    def store_meta(self, *, background: bool = False) -> None:
        """Stores the meta as it is now; ``background``: on the sync thread (its time is not
        the tick thread's ``io_seconds``, and ``io_clock`` reads the tick thread's clocks,
        which are gone once it has ended)."""
        self._check()
        if background:
            self._store_meta()
            return
        t0 = self.io_clock()
        self._store_meta()
        self.io_seconds += self.io_clock() - t0

    def _store_meta(self) -> None:
        try:
            with self._meta_lock:
                self.meta_file.store(self._capped(self.meta))
        except OSError as exc:
            self._fail(f"writing {self.meta_file.path} failed: {exc}", exc)

    def align_to_snapshot(self, prev: Entry, last: Entry) -> None:
        """At start-up: if the journal holds the snapshot's last two entries, drop what comes
        before them, so PySyncObj keeps the rest.

        PySyncObj keeps the journal only if its first two entries are the snapshot's
        (``__loadDumpFile``); otherwise it clears it. After a crash between the rename of a new
        snapshot and the compaction of the journal, the journal still starts earlier, and
        PySyncObj would throw away every entry after the snapshot, entries this node may have
        acknowledged (defect D12)."""
        if not self._entries:
            return
        position = prev[1] - self._entries[0][1]
        if (0 < position < len(self._entries) - 1 and self._entries[position] == tuple(prev)
                and self._entries[position + 1] == tuple(last)):
            log.warning("%s: the snapshot at entry %d was taken but the journal not compacted "
                        "(a crash in between): compacting it now", self.path, last[1])
            self._rewrite(self._entries[position:])

    def _capped(self, meta: Meta) -> Meta:
        return meta.with_commit(min(meta.commit_index, max(self.synced_index, 1)))

    def _snapshot_durable(self) -> None:
        """The snapshot that covers what is about to be forgotten, and its name, on disk."""
        self._check()
        try:
            if os.path.exists(self.snapshot_path):
                fsync_path(self.snapshot_path)
            fsync_path(self.directory)
        except OSError as exc:
            self._fail(f"fsync of {self.snapshot_path} failed: {exc}", exc)

    def _truncate(self, position: int) -> None:
        """Drops the entries from ``position`` on; a file left with no entry keeps only its
        header (so ``clear`` also drops a dead prefix)."""
        end = self._offsets[position] if position < len(self._offsets) else self._end
        with self._lock:
            if position == 0:
                self._files = [(fd, end - len(MAGIC)) for fd, _shift in self._files]
            for fd, shift in self._files:
                self._io("truncate", os.ftruncate, fd, end - shift)
            del self._entries[position:]
            del self._offsets[position:]
            self._end = end
            self._epoch += 1
            self.synced_index = min(self.synced_index, self._last_index())
        self._dirty = True

    def _rewrite(self, keep: list[Entry]) -> None:
        """Replaces the file with one holding ``keep``: written aside, fsynced, renamed."""
        self._check()
        tmp = self.path + ".tmp"
        records = [encode(idx, term, payload) for payload, idx, term in keep]
        offsets, offset = [], len(MAGIC)
        for record in records:
            offsets.append(offset)
            offset += len(record)
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + b"".join(records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_path(self.directory)
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            self._fail(f"compacting {self.path} failed: {exc}", exc)
        with self._lock:
            close_all(old for old, _shift in self._files)
            self._files = [(fd, 0)]
            self._entries, self._offsets, self._end = list(keep), offsets, offset
            self._epoch += 1
            self.synced_index = self._last_index()
        self._dirty = False

    def reclaim(self) -> Iterator[None]:
        """On the sync thread, a step per ``next``: the file's dead prefix dropped by a copy
        of the live part that replaces it, while the tick thread goes on appending."""
        with self._lock:
            if not self._files:
                return
            fd, shift = self._files[0]
            start = self._offsets[0] if self._offsets else self._end
            copied, epoch = self._end, self._epoch
            source = self._io("dup", os.dup, fd)
        copy: int | None = None  # both descriptors close however the reclaim ends (closed too)
        try:
            if start - shift == len(MAGIC):
                return
            # After reading where the live part starts: the snapshot covering what lies before
            # it was renamed into place before that, so this sync covers it.
            self._snapshot_durable()
            yield
            tmp = self.path + ".tmp"
            copy = self._io("create", os.open, tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            new_shift = start - len(MAGIC)
            self._io("write", os.pwrite, copy, MAGIC, 0)
            copied = self._copy((source, shift), (copy, new_shift), start, copied)
            yield
            with self._lock:
                abandoned = self._epoch != epoch or not self._files  # truncated, or closed
                if not abandoned:
                    if self._copy((source, shift), (copy, new_shift), copied, self._end) \
                            < self._end:
                        self._fail(f"{self.path} is shorter than its entries",
                                   OSError("short read"))
                    mirror = self._io("dup", os.dup, copy)  # ours stays open if it closes
                    self._files.append((mirror, new_shift))
            if abandoned:
                self._io("unlink", os.unlink, tmp)
                return
            yield
            t0 = time.perf_counter()
            self._io("fdatasync", os.fdatasync, copy)
            self._io("rename", os.replace, tmp, self.path)
            self._io("fsync", fsync_path, self.directory)
            with self._lock:
                old = [f for f, _shift in self._files if f != mirror]
                self._files = [(f, s) for f, s in self._files if f == mirror]
            close_all(old)
        finally:
            close_all([source] if copy is None else [source, copy])
        # Log text only (what an operator reads; nothing acts on it): not mutated.
        log.info("compacted in the background: %d entries kept, %.0f ms to make it durable",  # pragma: no mutate
                 len(self._entries), (time.perf_counter() - t0) * 1e3)  # pragma: no mutate

    def _copy(self, source: tuple[int, int], target: tuple[int, int], at: int,
               end: int) -> int:
        """The journal's bytes from offset ``at`` to ``end`` copied from one (descriptor,
        shift) to another; returns where it stopped: ``end``, or where ``source`` ends (a
        truncation meanwhile)."""
        while at < end:
            chunk = self._io("read", os.pread, source[0], end - at, at - source[1])
            if not chunk:
                break
            self._io("write", os.pwrite, target[0], chunk, at - target[1])
            at += len(chunk)
        return at

    def _io(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        self._check()
        try:
            return call(*args)
        except OSError as exc:
            self._fail(f"{what} on {self.path} failed: {exc}", exc)

    def _check(self) -> None:
        if self.failed:
            raise JournalFailed(self.failed)

    def _fail(self, reason: str, cause: OSError) -> NoReturn:
        self.failed = reason
        log.critical("%s: the node stops (fail-stop)", reason)
        self.on_failure(reason)
        raise JournalFailed(reason) from cause
