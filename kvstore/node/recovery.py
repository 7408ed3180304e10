"""What a node does with its files before PySyncObj starts: it restarts from any crash state,
or refuses with one line that names the file and the way out (never a traceback).

The data directory holds ``raft.journal`` (``kvstore.node.journal``), ``raft.meta``
(``kvstore.node.meta_file``), ``raft.dump`` (``kvstore.node.dump_file``) and, from before this
layer existed, PySyncObj's own ``raft.journal.meta``. ``prepare`` looks at them in that order
and returns the journal PySyncObj will use. Every case has a test in
``tests/unit/test_recovery.py``:

========================================================  =========================================
found                                                     what happens
========================================================  =========================================
nothing                                                   a new node
only a dump (``kv snapshot restore``)                     a new node that starts from the dump
temporary files (``*.tmp``)                               removed: a temporary file is never in use
                                                          at start-up (it is renamed when complete)
journal missing, empty, zero-filled, or a cut header      a new, empty journal (a warning if the
                                                          node had state): it catches up from peers
journal with a torn tail (cut short, zeros, last record   the tail is dropped: it was never
fails its checksum)                                       acknowledged in durable mode
journal with a bad record followed by a good one          refused: the disk is damaged
journal with an unknown header                            refused
journal in PySyncObj's format (older versions)            converted
meta missing, empty or failing its checksum               term from the log and no vote in that
                                                          term (a warning)
dump failing its checksum                                 set aside if the journal still starts at
                                                          entry 1, else refused
dump missing but the journal compacted                    refused
journal starting after the dump, with entries beyond it   refused (a gap)
dump renamed but journal not yet compacted (D12, or       the journal is compacted now
its file not yet: ``Journal.reclaim``)
========================================================  =========================================

The way out of a refusal is to replace the node (README, Membership): a node that lost what it
stored must not come back under its old identity, or a write committed with its help could be
lost. Moving the data directory away keeps it for inspection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field

from kvstore.config import CannotRestart
from kvstore.node import dump_file
from kvstore.node import journal as journal_mod
from kvstore.node.journal import MAGIC, Entry, Journal, JournalCorrupt
from kvstore.node.meta_file import VOTE_UNKNOWN, Meta, MetaFile

log = logging.getLogger("kvstore.node.recovery")

JOURNAL = "raft.journal"
META = "raft.meta"
DUMP = "raft.dump"
LEGACY_META = "raft.journal.meta"
TEMPORARY = ("raft.journal.tmp", "raft.meta.tmp", "raft.journal.meta.tmp", "raft.dump.tmp",
             "raft.dump.1.tmp")
"""Ours and PySyncObj's (its meta, its dump, and a dump being received from the leader)."""

_LEGACY_NAME = b"PYSYNCOBJ"
_LEGACY_FIRST_RECORD = 40
_LEGACY_LAST_RECORD_OFFSET = 36

_DIGEST_BYTES = 32


@dataclass(frozen=True)
class DumpInfo:
    prev: Entry
    last: Entry


@dataclass
class Paths:
    data_dir: str
    journal: str = field(init=False)
    meta: str = field(init=False)
    dump: str = field(init=False)
    legacy_meta: str = field(init=False)

    def __post_init__(self) -> None:
        self.journal = os.path.join(self.data_dir, JOURNAL)
        self.meta = os.path.join(self.data_dir, META)
        self.dump = os.path.join(self.data_dir, DUMP)
        self.legacy_meta = os.path.join(self.data_dir, LEGACY_META)


def way_out(data_dir: str) -> str:
    return (f"this node must be replaced, not restarted (move {data_dir} away, then: kv cluster "
            "remove-node ID && kv cluster add-node; or kv member remove, then add a new node)")


def prepare(data_dir: str) -> Journal:
    """The journal to hand to PySyncObj, after every repair that is safe; ``CannotRestart``
    otherwise."""
    paths = Paths(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    for name in TEMPORARY:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(data_dir, name))
            log.info("removed %s, left by a crash", name)
    seeded = not os.path.exists(paths.journal) and not os.path.exists(paths.meta)
    """Only a dump, or nothing: a new node (``kv snapshot restore`` seeds nodes with a dump)."""
    try:
        dump = _check_dump(paths)
        journal = _open_journal(paths, seeded)
    except JournalCorrupt as exc:
        raise CannotRestart(f"{exc}; {way_out(data_dir)}") from None
    _check_meta(paths, journal, dump, seeded)
    if journal:
        first = journal[0][1]
        if dump is None and first > 1:
            _refuse(paths, f"{paths.dump} is missing but {paths.journal} starts at entry "
                    f"{first}: the snapshot of the entries before it is gone")
        if dump is not None:
            journal.align_to_snapshot(dump.prev, dump.last)
            first, end = journal[0][1], journal[-1][1]
            if first > dump.prev[1] and end > dump.last[1]:
                _refuse(paths, f"{paths.journal} starts at entry {first}, after the snapshot's "
                        f"last entries ({dump.prev[1]}, {dump.last[1]}): entries in between "
                        "are missing")
        if journal.meta.commit_index > journal[-1][1] and dump is None:
            journal.meta = journal.meta.with_commit(journal[-1][1])
    return journal


def _refuse(paths: Paths, problem: str) -> None:
    raise CannotRestart(f"{problem}; {way_out(paths.data_dir)}")


# -- the journal ------------------------------------------------------------------------------

def _open_journal(paths: Paths, seeded: bool) -> Journal:
    meta = MetaFile(paths.meta)
    try:
        with open(paths.journal, "rb") as f:
            head = f.read(len(MAGIC))
    except FileNotFoundError:
        if not seeded and _had_state(paths):
            log.warning("%s is missing: its name never reached the disk; starting with an "
                        "empty log (the node catches up from its peers)", paths.journal)
        Journal.create(paths.journal)
        return Journal.open(paths.journal, meta, paths.dump)
    if head == MAGIC:
        return Journal.open(paths.journal, meta, paths.dump)
    if head.startswith(_LEGACY_NAME):
        _convert_legacy(paths)
        return Journal.open(paths.journal, meta, paths.dump)
    if MAGIC.startswith(head) or _all_zero(paths.journal):
        if head or _had_state(paths):
            log.warning("%s is %s: it never reached the disk; starting with an empty log (the "
                        "node catches up from its peers)", paths.journal,
                        "empty" if not head else "zero-filled or cut short")
        Journal.create(paths.journal)
        return Journal.open(paths.journal, meta, paths.dump)
    raise CannotRestart(f"{paths.journal} is not a journal (its header is neither kvstore's nor "
                        f"PySyncObj's); {way_out(paths.data_dir)}")


def _all_zero(path: str) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


def _had_state(paths: Paths) -> bool:
    return any(os.path.exists(p) for p in (paths.meta, paths.dump, paths.legacy_meta))


def _convert_legacy(paths: Paths) -> None:
    """PySyncObj's journal (older versions of this project) rewritten in ours. It has no
    checksums: records are read up to the last one that is consistent."""
    with open(paths.journal, "rb") as f:
        data = f.read()
    entries: list[Entry] = []
    offset = _LEGACY_FIRST_RECORD
    (last_offset,) = struct.unpack_from("<I", data, _LEGACY_LAST_RECORD_OFFSET) \
        if len(data) >= _LEGACY_FIRST_RECORD else (0,)
    end = min(last_offset, len(data))
    while offset + 4 <= end:
        (size,) = struct.unpack_from("<I", data, offset)
        if size < 16 or offset + 8 + size > end:
            break
        (trailer,) = struct.unpack_from("<I", data, offset + 4 + size)
        idx, term = struct.unpack_from("<QQ", data, offset + 4)
        if trailer != size or (entries and (idx != entries[-1][1] + 1 or term < entries[-1][2])):
            break
        entries.append((data[offset + 20:offset + 4 + size], idx, term))
        offset += size + 8
    tmp = paths.journal + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + b"".join(journal_mod.encode(i, t, c) for c, i, t in entries))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, paths.journal)
    journal_mod.fsync_path(paths.data_dir)
    log.warning("%s: converted %d entries from PySyncObj's format", paths.journal, len(entries))


# -- term and vote ----------------------------------------------------------------------------

def _check_meta(paths: Paths, journal: Journal, dump: DumpInfo | None, seeded: bool) -> None:
    stored, why = journal.meta_file.load()
    if stored is not None:
        journal.meta = stored
        return
    legacy = _legacy_meta(paths)
    if legacy is not None:
        journal.meta = legacy
        log.info("%s: term %d and vote taken from PySyncObj's %s", paths.meta, legacy.term,
                 LEGACY_META)
    elif journal or (dump is not None and not seeded):
        terms = ([journal[-1][2]] if journal else []) + ([dump.last[2]] if dump else [])
        term = max(terms)
        journal.meta = Meta(term=term, voted_for=VOTE_UNKNOWN)
        log.warning("%s is %s: term and vote are lost. Restarting at the term of the last "
                    "entry (%d), granting no vote in it; a vote cast in a later term is "
                    "forgotten", paths.meta, why, term)
    journal.store_meta()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.legacy_meta)


def _legacy_meta(paths: Paths) -> Meta | None:
    try:
        with open(paths.legacy_meta, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    from pysyncobj.pickle import loads  # our own node's file, not a peer's bytes

    try:
        doc = loads(data)
        return Meta(term=int(doc.get("currentTerm", 0)), voted_for=doc.get("votedForNodeId"),
                    commit_index=int(doc.get("raftCommitIndex", 1)))
    except Exception:  # noqa: BLE001 - 0 bytes after a power loss (D9), or garbage
        log.warning("%s is empty or unreadable (D9)", paths.legacy_meta)
        return None


# -- the snapshot -----------------------------------------------------------------------------

def _check_dump(paths: Paths) -> DumpInfo | None:
    """The dump's last two entries, if there is a dump that passes its checksum. A damaged
    dump is set aside when the journal alone rebuilds the state, else refused."""
    if not os.path.exists(paths.dump):
        return None
    problem = _verify_dump(paths.dump)
    if problem is None:
        return _dump_entries(paths.dump)
    if _journal_starts_at_one(paths.journal):
        damaged = paths.dump + ".damaged"
        os.replace(paths.dump, damaged)
        journal_mod.fsync_path(paths.data_dir)
        log.warning("%s %s; the journal holds every entry from the first, so the node "
                    "rebuilds its state from it (the dump is kept as %s)", paths.dump, problem,
                    damaged)
        return None
    raise CannotRestart(f"{paths.dump} {problem} and the journal no longer holds the entries "
                        f"it covers; {way_out(paths.data_dir)}")


def _verify_dump(path: str) -> str | None:
    """Every dump format ends with the sha256 of everything before it."""
    size = os.path.getsize(path)
    if size < len(dump_file.MAGIC) + _DIGEST_BYTES:
        return "is empty or cut short"
    checksum = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size - _DIGEST_BYTES
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            checksum.update(chunk)
            remaining -= len(chunk)
        if f.read() != checksum.digest():
            return "fails its checksum"
    return None


def _dump_entries(path: str) -> DumpInfo:
    with open(path, "rb") as f:
        meta = dump_file.read_meta(f)

    def entry(doc: list[object]) -> Entry:
        return bytes.fromhex(str(doc[0])), int(str(doc[1])), int(str(doc[2]))

    return DumpInfo(prev=entry(meta["prev"]), last=entry(meta["last"]))


def _journal_starts_at_one(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read(len(MAGIC) + journal_mod.RECORD.size)
    except FileNotFoundError:
        return False
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + journal_mod.RECORD.size:
        return False
    _length, _crc, index, _term = journal_mod.RECORD.unpack_from(data, len(MAGIC))
    return bool(index == 1)
