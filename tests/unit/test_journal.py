"""``kvstore.node.journal`` and ``meta_file``: PySyncObj's journal interface on a checksummed
file, torn tails, compaction after a durable snapshot, fail-stop, and the atomic meta file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.node import journal as journal_mod
from kvstore.node.journal import MAGIC, Journal, JournalCorrupt, JournalFailed
from kvstore.node.meta_file import Meta, MetaFile


def new_journal(tmp_path: Path) -> Journal:
    path = str(tmp_path / "raft.journal")
    Journal.create(path)
    return Journal.open(path, MetaFile(str(tmp_path / "raft.meta")), str(tmp_path / "raft.dump"))


def reopen(journal: Journal) -> Journal:
    journal._destroy()
    return Journal.open(journal.path, journal.meta_file, journal.snapshot_path)


def filled(tmp_path: Path, count: int) -> Journal:
    journal = new_journal(tmp_path)
    for index in range(1, count + 1):
        journal.add(b"command %d" % index, index, 1 + index // 4)
    return journal


def test_entries_come_back_as_pysyncobj_stored_them(tmp_path: Path) -> None:
    journal = filled(tmp_path, 10)
    again = reopen(journal)
    assert len(again) == 10
    assert again[0] == (b"command 1", 1, 1)
    assert again[-1] == (b"command 10", 10, 3)
    assert again[2:4] == [(b"command 3", 3, 1), (b"command 4", 4, 2)]


def test_a_conflict_truncates_the_file_too(tmp_path: Path) -> None:
    journal = filled(tmp_path, 10)
    journal.deleteEntriesFrom(6)
    journal.add(b"new 7", 7, 9)
    again = reopen(journal)
    assert [e[1] for e in again] == [1, 2, 3, 4, 5, 6, 7]
    assert again[-1] == (b"new 7", 7, 9)


def test_compaction_keeps_the_tail_in_a_new_file(tmp_path: Path) -> None:
    journal = filled(tmp_path, 10)
    journal.deleteEntriesTo(7)
    assert [e[1] for e in journal] == [8, 9, 10]
    journal.add(b"command 11", 11, 3)
    assert [e[1] for e in reopen(journal)] == [8, 9, 10, 11]
    assert not os.path.exists(journal.path + ".tmp")


def test_a_torn_last_record_is_dropped(tmp_path: Path) -> None:
    journal = filled(tmp_path, 5)
    journal._destroy()
    size = os.path.getsize(journal.path)
    with open(journal.path, "r+b") as f:
        f.truncate(size - 3)
    again = Journal.open(journal.path, journal.meta_file, journal.snapshot_path)
    assert [e[1] for e in again] == [1, 2, 3, 4]
    assert os.path.getsize(journal.path) < size - 3, "the torn bytes are cut off the file"


def test_a_zero_filled_tail_is_dropped(tmp_path: Path) -> None:
    journal = filled(tmp_path, 5)
    journal._destroy()
    with open(journal.path, "ab") as f:
        f.write(bytes(4096))
    assert [e[1] for e in Journal.open(journal.path, journal.meta_file,
                                        journal.snapshot_path)] == [1, 2, 3, 4, 5]


def test_a_last_record_whose_checksum_fails_is_a_torn_write(tmp_path: Path) -> None:
    journal = filled(tmp_path, 5)
    journal._destroy()
    with open(journal.path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"XX")
    assert len(Journal.open(journal.path, journal.meta_file, journal.snapshot_path)) == 4


def test_a_bad_record_followed_by_a_good_one_is_corruption(tmp_path: Path) -> None:
    journal = filled(tmp_path, 5)
    offset = journal._offsets[2]
    journal._destroy()
    with open(journal.path, "r+b") as f:
        f.seek(offset + journal_mod.RECORD.size)
        f.write(b"X")
    with pytest.raises(JournalCorrupt, match="a valid record follows"):
        Journal.open(journal.path, journal.meta_file, journal.snapshot_path)


def test_records_out_of_order_are_corruption(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    path.write_bytes(MAGIC + journal_mod.encode(1, 1, b"a") + journal_mod.encode(3, 1, b"b"))
    with pytest.raises(JournalCorrupt, match="out of order"):
        Journal.open(str(path), MetaFile(str(tmp_path / "m")), str(tmp_path / "d"))


def test_entries_are_forgotten_only_after_the_snapshot_is_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 10)
    (tmp_path / "raft.dump").write_bytes(b"snapshot")
    order: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(f"rename {Path(b).name}"),
                                                     os.rename(a, b))[1])
    journal.deleteEntriesTo(5)
    dump_synced = order.index(str(tmp_path / "raft.dump"))
    journal_renamed = order.index("rename raft.journal")
    assert dump_synced < journal_renamed
    assert order[dump_synced + 1] == str(tmp_path), "and the snapshot's name (its directory)"


def test_a_snapshot_from_the_leader_is_synced_before_the_journal_is_cleared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PySyncObj writes a received snapshot and renames it without an fsync (D13), then clears
    the journal: clearing first syncs the snapshot and its name."""
    journal = filled(tmp_path, 10)
    (tmp_path / "raft.dump").write_bytes(b"snapshot from the leader")
    order: list[str] = []
    real_fsync, real_ftruncate = os.fsync, os.ftruncate
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                real_fsync(fd))[1])
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (order.append("truncate journal"),
                                                        real_ftruncate(fd, n))[1])
    journal.clear()
    assert order == [str(tmp_path / "raft.dump"), str(tmp_path), "truncate journal"]
    assert len(journal) == 0


def test_sync_makes_the_appended_entries_durable_and_says_so(tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    assert journal.dirty
    journal.sync()
    assert not journal.dirty and journal.synced_index == 3
    journal.add(b"x", 4, 1)
    assert journal.dirty and journal.synced_index == 3


def test_a_failed_fsync_poisons_the_journal(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 3)
    told: list[str] = []
    journal.on_failure = told.append

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(JournalFailed):
        journal.sync()
    monkeypatch.undo()
    assert told and "fdatasync" in told[0]
    with pytest.raises(JournalFailed):
        journal.sync()  # never retried: the kernel may have dropped the pages
    with pytest.raises(JournalFailed):
        journal.add(b"y", 4, 1)
    with pytest.raises(JournalFailed):
        journal.setCurrentTerm(5, None)


def test_term_and_vote_are_stored_before_set_current_term_returns(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    journal.setCurrentTerm(7, "127.0.0.1:1")
    meta, why = MetaFile(str(tmp_path / "raft.meta")).load()
    assert why == "" and meta == Meta(term=7, voted_for="127.0.0.1:1", commit_index=1)


def test_the_stored_commit_index_never_runs_ahead_of_the_durable_log(tmp_path: Path) -> None:
    journal = filled(tmp_path, 10)
    journal.sync()
    journal.add(b"x", 11, 3)
    journal.setRaftCommitIndex(11)
    journal.onOneSecondTimer()
    meta, _ = MetaFile(str(tmp_path / "raft.meta")).load()
    assert meta is not None and meta.commit_index == 10
    journal.sync()
    journal.onOneSecondTimer()
    meta, _ = MetaFile(str(tmp_path / "raft.meta")).load()
    assert meta is not None and meta.commit_index == 11


def test_a_meta_file_that_fails_its_checksum_is_not_believed(tmp_path: Path) -> None:
    meta_file = MetaFile(str(tmp_path / "raft.meta"))
    meta_file.store(Meta(term=3, voted_for=None, commit_index=9))
    data = (tmp_path / "raft.meta").read_bytes()
    (tmp_path / "raft.meta").write_bytes(data.replace(b'"term": 3', b'"term": 4'))
    assert MetaFile(str(tmp_path / "raft.meta")).load() == (None, "fails its checksum")
    (tmp_path / "raft.meta").write_bytes(b"")
    assert MetaFile(str(tmp_path / "raft.meta")).load() == (None, "empty")


def test_a_crash_while_storing_the_meta_leaves_the_old_copy(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    meta_file = MetaFile(str(tmp_path / "raft.meta"))
    meta_file.store(Meta(term=3))

    def crash(*_: object) -> None:
        raise SystemExit("killed between the write and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        meta_file.store(Meta(term=4))
    monkeypatch.undo()
    assert MetaFile(str(tmp_path / "raft.meta")).load()[0] == Meta(term=3)


def test_closing_goes_on_past_a_descriptor_that_fails_and_then_says_so(tmp_path: Path) -> None:
    """A dead disk fails a close yet frees the descriptor: the ones after it must close too."""
    good = os.open(tmp_path, os.O_RDONLY)
    bad = os.open(tmp_path, os.O_RDONLY)
    os.close(bad)  # closing it again fails (EBADF), as a close on a dead disk fails (EIO)
    with pytest.raises(OSError):
        journal_mod.close_all([bad, good])
    with pytest.raises(OSError):
        os.fstat(good)  # closed
