"""More rules of ``kvstore.node.journal`` and ``kvstore.node.meta_file``, one claim per test:
the edges ``tests/unit/test_journal.py`` leaves open, found by mutation testing (``make mutate``).
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import pytest

from kvstore.node import recovery
from kvstore.node.journal import (
    MAGIC,
    RECORD,
    Journal,
    JournalCorrupt,
    JournalFailed,
    encode,
)
from kvstore.node.meta_file import FORMAT_VERSION, Meta, MetaFile


def new_journal(tmp_path: Path) -> Journal:
    path = str(tmp_path / recovery.JOURNAL)
    Journal.create(path)
    return Journal.open(path, MetaFile(str(tmp_path / recovery.META)),
                        str(tmp_path / recovery.DUMP))


def filled(tmp_path: Path, count: int, term: int = 1) -> Journal:
    journal = new_journal(tmp_path)
    for index in range(1, count + 1):
        journal.add(b"command %d" % index, index, term)
    return journal


def reopened(journal: Journal) -> list[tuple[bytes, int, int]]:
    journal._destroy()
    return Journal.open(journal.path, journal.meta_file, journal.snapshot_path)[:]


def fsync_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def recording(fd: int, real=real) -> None:  # type: ignore[no-untyped-def]
            calls.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)
        monkeypatch.setattr(os, name, recording)
    return calls


def io_error(*_: object) -> None:
    raise OSError(5, "Input/output error")


# -- the file format and what start-up accepts --------------------------------------------------

def test_a_record_is_length_crc_index_term_then_the_payload(tmp_path: Path) -> None:
    """The documented format, byte for byte (little-endian; the crc32 covers length, index,
    term and payload)."""
    journal = new_journal(tmp_path)
    journal.add(b"abc", 7, 3)
    journal.sync()
    raw = Path(journal.path).read_bytes()
    fields = (3).to_bytes(4, "little") + (7).to_bytes(8, "little") + (3).to_bytes(8, "little")
    crc = zlib.crc32(b"abc", zlib.crc32(fields))
    assert raw == (MAGIC + (3).to_bytes(4, "little") + crc.to_bytes(4, "little")
                   + (7).to_bytes(8, "little") + (3).to_bytes(8, "little") + b"abc")
    journal._destroy()


def test_a_valid_record_whose_term_goes_back_is_corruption(tmp_path: Path) -> None:
    """Terms in a Raft log never decrease."""
    path = tmp_path / recovery.JOURNAL
    path.write_bytes(MAGIC + encode(1, 2, b"a") + encode(2, 1, b"b"))
    with pytest.raises(JournalCorrupt) as corrupt:
        Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")
    assert str(corrupt.value) == (
        f"{recovery.JOURNAL}: the record at offset {len(MAGIC) + RECORD.size + 1} is valid but "
        "out of order (its index or term does not follow)")


def test_a_bad_record_at_the_end_of_the_file_is_a_torn_write_not_corruption(
        tmp_path: Path) -> None:
    """Its checksum fails, but nothing valid follows it: a write the power cut short."""
    path = tmp_path / recovery.JOURNAL
    last = bytearray(encode(3, 1, b"c"))
    last[-1] ^= 0xFF
    path.write_bytes(MAGIC + encode(1, 1, b"a") + encode(2, 1, b"b") + bytes(last))
    journal = Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")
    assert [e[1] for e in journal] == [1, 2]
    assert path.stat().st_size == len(MAGIC) + 2 * (RECORD.size + 1)


def test_a_torn_tail_is_dropped_with_a_warning_that_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / recovery.JOURNAL
    path.write_bytes(MAGIC + encode(1, 1, b"a") + encode(2, 1, b"b")[:-1])
    caplog.set_level(logging.WARNING, "kvstore.node.journal")
    Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (f"{path}: dropped {RECORD.size + 1 - 1} bytes after entry 1 (cut short): "
                       "a write the power cut short")


def test_a_torn_first_record_is_reported_as_after_no_entry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / recovery.JOURNAL
    path.write_bytes(MAGIC + bytes(RECORD.size - 1))
    caplog.set_level(logging.WARNING, "kvstore.node.journal")
    assert len(Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")) == 0
    assert "after entry none (cut short)" in caplog.records[0].getMessage()


def test_a_record_claiming_more_than_the_file_holds_is_cut_short(tmp_path: Path) -> None:
    path = tmp_path / recovery.JOURNAL
    record = bytearray(encode(2, 1, b"b"))
    record[0:4] = (2).to_bytes(4, "little")  # claims 2 payload bytes, the file has 1
    path.write_bytes(MAGIC + encode(1, 1, b"a") + bytes(record))
    assert [e[1] for e in Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")] == [1]


def test_an_intact_journal_is_not_rewritten_at_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 3)
    journal._destroy()
    calls = fsync_calls(monkeypatch)
    Journal.open(journal.path, journal.meta_file, journal.snapshot_path)
    assert calls == []


# -- appending, truncating, compacting -------------------------------------------------------------

def test_a_command_handed_as_a_bytearray_is_stored_as_bytes(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    journal.add(bytearray(b"abc"), 1, 1)
    assert journal[0] == (b"abc", 1, 1) and type(journal[0][0]) is bytes
    assert reopened(journal) == [(b"abc", 1, 1)]


def test_deleting_from_the_end_changes_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PySyncObj calls ``deleteEntriesFrom`` with the log's length when nothing conflicts."""
    journal = filled(tmp_path, 3)
    journal.sync()
    monkeypatch.setattr(os, "ftruncate", io_error)
    journal.deleteEntriesFrom(3)
    assert len(journal) == 3 and not journal.dirty


def test_a_conflict_truncation_must_be_synced(tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    journal.sync()
    journal.deleteEntriesFrom(1)
    assert journal.dirty and len(journal) == 1


def test_compacting_nothing_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 3)
    journal.sync()
    calls = fsync_calls(monkeypatch)
    journal.deleteEntriesTo(0)
    assert calls == [] and len(journal) == 3


def test_a_compacted_journal_is_durable_and_offsets_follow_the_new_file(tmp_path: Path) -> None:
    """After compaction the kept entries are on disk (a new, synced file), and a later
    conflict truncates at the right byte."""
    journal = filled(tmp_path, 10)
    journal.deleteEntriesTo(4)
    assert not journal.dirty and journal.synced_index == 10
    journal.deleteEntriesFrom(2)
    journal.add(b"new 7", 7, 2)
    assert reopened(journal) == [(b"command 5", 5, 1), (b"command 6", 6, 1), (b"new 7", 7, 2)]


def test_compacting_every_entry_leaves_an_empty_synced_log(tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    journal.deleteEntriesTo(3)
    assert len(journal) == 0 and journal.synced_index == 0 and not journal.dirty
    assert Path(journal.path).read_bytes() == MAGIC


def test_clearing_a_journal_without_a_snapshot_file_syncs_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 3)
    calls = fsync_calls(monkeypatch)
    journal.clear()
    assert calls == [str(tmp_path)] and len(journal) == 0
    assert reopened(journal) == []


def test_clearing_an_empty_journal_is_allowed(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    journal.clear()
    assert len(journal) == 0


def test_appending_after_a_clear_starts_after_the_header(tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    journal.clear()
    journal.add(b"x", 9, 4)
    assert reopened(journal) == [(b"x", 9, 4)]


def test_the_temporary_files_a_crash_can_leave_are_the_ones_recovery_removes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journal creation, compaction and the meta file each write aside and rename; a crash
    before the rename leaves exactly a file that start-up removes."""
    journal = filled(tmp_path, 3)

    def crash(*_: object) -> None:
        raise SystemExit("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    for step in (lambda: Journal.create(str(tmp_path / "raft.journal")),
                 lambda: journal.deleteEntriesTo(1),
                 lambda: MetaFile(str(tmp_path / recovery.META)).store(Meta(term=2))):
        with pytest.raises(SystemExit):
            step()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert left == ["raft.journal.tmp", "raft.meta.tmp"]
    assert set(left) <= set(recovery.TEMPORARY)


# -- fail-stop -------------------------------------------------------------------------------------

def test_a_failed_compaction_poisons_the_journal_and_tells_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    journal = filled(tmp_path, 5)
    told: list[str] = []
    journal.on_failure = told.append
    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(JournalFailed, match="compacting"):
        journal.deleteEntriesTo(2)
    monkeypatch.undo()
    assert told == [journal.failed] == [
        f"compacting {journal.path} failed: [Errno 5] Input/output error"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL] == [
        f"{told[0]}: the node stops (fail-stop)"]
    assert len(journal) == 5, "the entries in memory are kept: nothing was forgotten"
    with pytest.raises(JournalFailed):
        journal.deleteEntriesTo(2)


def test_a_failed_write_poisons_the_journal(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 2)
    monkeypatch.setattr(os, "pwrite", io_error)
    with pytest.raises(JournalFailed) as failed:
        journal.add(b"x", 3, 1)
    assert str(failed.value) == f"write on {journal.path} failed: [Errno 5] Input/output error"
    assert len(journal) == 2


@pytest.mark.parametrize("call, what", [("ftruncate", "truncate"), ("fdatasync", "fdatasync")])
def test_a_failed_truncation_or_sync_says_which_and_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, what: str) -> None:
    journal = filled(tmp_path, 2)
    monkeypatch.setattr(os, call, io_error)
    with pytest.raises(JournalFailed):
        journal.deleteEntriesFrom(0) if call == "ftruncate" else journal.sync()
    assert journal.failed == f"{what} on {journal.path} failed: [Errno 5] Input/output error"


def test_a_failed_snapshot_sync_forgets_nothing(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 5)
    (tmp_path / recovery.DUMP).write_bytes(b"snapshot")
    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(JournalFailed, match="fsync of"):
        journal.clear()
    monkeypatch.undo()
    assert len(journal) == 5
    assert journal.failed == (f"fsync of {tmp_path / recovery.DUMP} failed: "
                              "[Errno 5] Input/output error")


def test_a_failed_meta_store_poisons_the_journal(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A vote that may not be on disk must not be acted on."""
    journal = new_journal(tmp_path)
    told: list[str] = []
    journal.on_failure = told.append
    monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(JournalFailed, match="writing"):
        journal.setCurrentTerm(3, "127.0.0.1:1")
    assert told == [f"writing {tmp_path / recovery.META} failed: [Errno 5] Input/output error"]
    monkeypatch.undo()
    with pytest.raises(JournalFailed):
        journal.sync()


def test_a_clean_stop_after_a_failure_closes_without_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 2)
    monkeypatch.setattr(os, "fdatasync", io_error)
    with pytest.raises(JournalFailed):
        journal.sync()
    journal._destroy()  # no second failure: nothing is retried
    journal._destroy()  # and a second stop is a no-op
    assert journal._files == []


def test_a_clean_stop_makes_the_entries_and_meta_durable(tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    journal.setRaftCommitIndex(3)
    journal._destroy()
    meta, _ = MetaFile(str(tmp_path / recovery.META)).load()
    assert meta is not None and meta.commit_index == 3


# -- term, vote and commit index ---------------------------------------------------------------------

def test_the_stored_commit_index_of_an_empty_log_is_pysyncobjs_first(tmp_path: Path) -> None:
    """Nothing durable: the commit index stored is 1 (PySyncObj's first), never more."""
    journal = new_journal(tmp_path)
    journal.setRaftCommitIndex(5)
    journal.store_meta()
    meta, _ = MetaFile(str(tmp_path / recovery.META)).load()
    assert meta is not None and meta.commit_index == 1


def test_the_meta_file_is_rewritten_only_when_it_changes(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-second timer costs no fsync when term, vote and commit index are as stored."""
    journal = filled(tmp_path, 3)
    journal.sync()
    journal.setCurrentTerm(2, None)
    calls = fsync_calls(monkeypatch)
    journal.onOneSecondTimer()
    assert calls == []


def test_the_meta_file_loaded_at_start_up_is_not_rewritten(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    MetaFile(str(tmp_path / recovery.META)).store(Meta(term=4, voted_for="a"))
    journal = new_journal(tmp_path)
    calls = fsync_calls(monkeypatch)
    journal.onOneSecondTimer()
    assert calls == [] and journal.getCurrentTerm() == 4


def test_a_vote_is_stored_as_the_voted_for_nodes_name(tmp_path: Path) -> None:
    """PySyncObj hands the node it voted for; its name (str) is what is stored."""

    class Node:
        def __str__(self) -> str:
            return "127.0.0.1:7"

    journal = new_journal(tmp_path)
    journal.setCurrentTerm(3, Node())
    assert journal.getVotedForNodeId() == "127.0.0.1:7"
    journal.setCurrentTerm(4, None)
    assert journal.getVotedForNodeId() is None


def test_the_meta_file_format_is_one_json_line_and_its_crc(tmp_path: Path) -> None:
    """The documented format, byte for byte (so a file written by this version stays
    readable by the next)."""
    meta_file = MetaFile(str(tmp_path / recovery.META))
    meta_file.store(Meta(term=3, voted_for="127.0.0.1:1", commit_index=9))
    body = (b'{"commit_index": 9, "term": 3, "version": 1, "voted_for": "127.0.0.1:1"}')
    assert (tmp_path / recovery.META).read_bytes() == body + b"\n" + b"%08x\n" % zlib.crc32(body)


def test_a_meta_file_of_format_version_1_is_read(tmp_path: Path) -> None:
    body = b'{"commit_index": 4, "term": 2, "version": 1, "voted_for": null}'
    (tmp_path / recovery.META).write_bytes(body + b"\n%08x\n" % zlib.crc32(body))
    assert MetaFile(str(tmp_path / recovery.META)).load() == (Meta(2, None, 4), "")
    assert FORMAT_VERSION == 1


def test_a_meta_file_of_another_format_version_is_not_believed(tmp_path: Path) -> None:
    body = b'{"commit_index": 4, "term": 2, "version": 2, "voted_for": null}'
    (tmp_path / recovery.META).write_bytes(body + b"\n%08x\n" % zlib.crc32(body))
    assert MetaFile(str(tmp_path / recovery.META)).load() == (
        None, "format version 2, expected 1")


@pytest.mark.parametrize("content", [b"hello", b'{"term": 1}\n%08x\n' % zlib.crc32(b'{"term": 1}'),
                                     b"\n\n"], ids=["garbage", "fields-missing", "newlines"])
def test_a_file_that_is_not_a_meta_file_is_not_believed(tmp_path: Path, content: bytes) -> None:
    (tmp_path / recovery.META).write_bytes(content)
    meta_file = MetaFile(str(tmp_path / recovery.META))
    assert meta_file.load() == (None, "not a meta file")
    assert meta_file.stored is None


def test_a_missing_meta_file_is_the_default(tmp_path: Path) -> None:
    meta_file = MetaFile(str(tmp_path / recovery.META))
    assert meta_file.load() == (None, "missing")
    assert meta_file.load_or_default() == Meta(term=0, voted_for=None, commit_index=1)


def test_pysyncobjs_flush_is_a_sync(tmp_path: Path) -> None:
    journal = filled(tmp_path, 2)
    journal.flush()
    assert not journal.dirty and journal.synced_index == 2


# -- aligning to the snapshot at start-up (D12) ----------------------------------------------------

def aligned(tmp_path: Path, count: int, prev: tuple[bytes, int, int],
            last: tuple[bytes, int, int], caplog: pytest.LogCaptureFixture) -> list[int]:
    journal = filled(tmp_path, count, term=2)
    caplog.set_level(logging.WARNING, "kvstore.node.journal")
    journal.align_to_snapshot(prev, last)
    return [e[1] for e in journal]


def test_a_journal_holding_the_snapshots_last_two_entries_later_is_compacted_to_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kept = aligned(tmp_path, 9, (b"command 4", 4, 2), (b"command 5", 5, 2), caplog)
    assert kept == [4, 5, 6, 7, 8, 9]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / recovery.JOURNAL}: the snapshot at entry 5 was taken but the journal "
        "not compacted (a crash in between): compacting it now"]


def test_a_journal_already_starting_at_the_snapshot_is_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert aligned(tmp_path, 9, (b"command 1", 1, 2), (b"command 2", 2, 2), caplog) == list(
        range(1, 10))
    assert caplog.records == []


def test_a_journal_ending_at_the_snapshots_prev_entry_is_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its last entry is the snapshot's next to last: the snapshot's last is not in it."""
    assert aligned(tmp_path, 5, (b"command 5", 5, 2), (b"command 6", 6, 2), caplog) == list(
        range(1, 6))


@pytest.mark.parametrize("prev, last", [((b"other", 4, 2), (b"command 5", 5, 2)),
                                        ((b"command 4", 4, 2), (b"command 5", 5, 3))],
                         ids=["prev-differs", "last-differs"])
def test_a_journal_whose_entries_differ_from_the_snapshots_is_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, prev, last) -> None:  # type: ignore[no-untyped-def]
    """Only the very entries the snapshot ends with mark the place; PySyncObj will clear a
    journal that does not hold them."""
    assert aligned(tmp_path, 9, prev, last, caplog) == list(range(1, 10))
    assert caplog.records == []


def test_aligning_an_empty_journal_does_nothing(tmp_path: Path) -> None:
    journal = new_journal(tmp_path)
    journal.align_to_snapshot((b"p", 4, 2), (b"l", 5, 2))
    assert len(journal) == 0


def test_the_meta_files_own_directory_is_synced_after_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename is durable only once the directory that holds the file is synced."""
    calls = fsync_calls(monkeypatch)
    MetaFile(str(tmp_path / recovery.META)).store(Meta(term=2))
    assert calls == [str(tmp_path / "raft.meta.tmp"), str(tmp_path)]


def test_a_meta_file_named_without_a_directory_is_in_the_current_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    MetaFile(recovery.META).store(Meta(term=2))
    assert MetaFile(str(tmp_path / recovery.META)).load() == (Meta(term=2), "")


def test_the_checksum_is_the_last_line_of_the_meta_file(tmp_path: Path) -> None:
    """Everything before the last line is the body the crc covers, newlines included."""
    body = b'{"commit_index": 4,\n"term": 2, "version": 1, "voted_for": null}'
    (tmp_path / recovery.META).write_bytes(body + b"\n%08x\n" % zlib.crc32(body))
    assert MetaFile(str(tmp_path / recovery.META)).load() == (Meta(2, None, 4), "")


@pytest.mark.parametrize("after", [b" \n", b"X\n"], ids=["blank", "garbage"])
def test_a_meta_file_with_anything_after_its_checksum_line_is_not_believed(
        tmp_path: Path, after: bytes) -> None:
    meta_file = MetaFile(str(tmp_path / recovery.META))
    meta_file.store(Meta(term=3))
    with open(tmp_path / recovery.META, "ab") as f:
        f.write(after)
    assert MetaFile(str(tmp_path / recovery.META)).load() == (None, "not a meta file")


# -- what start-up reads back ---------------------------------------------------------------------

def test_a_reopened_journal_counts_its_entries_as_durable(tmp_path: Path) -> None:
    """What was read from the file is on disk: synced up to its last index, nothing dirty."""
    journal = new_journal(tmp_path)
    for index in range(1, 4):
        journal.add(b"c", index, 7)
    journal._destroy()
    again = Journal.open(journal.path, journal.meta_file, journal.snapshot_path)
    assert again.synced_index == 3 and not again.dirty
    other = tmp_path / "other"
    other.mkdir()
    assert new_journal(other).synced_index == 0


def test_a_reopened_journal_truncates_at_the_right_byte(tmp_path: Path) -> None:
    journal = filled(tmp_path, 5)
    journal._destroy()
    again = Journal.open(journal.path, journal.meta_file, journal.snapshot_path)
    again.deleteEntriesFrom(2)
    again.add(b"new 3", 3, 4)
    assert reopened(again) == [(b"command 1", 1, 1), (b"command 2", 2, 1), (b"new 3", 3, 4)]


def test_a_last_record_with_an_empty_payload_is_kept(tmp_path: Path) -> None:
    """A record is valid with no payload at all: exactly its header, at the end of the file."""
    path = tmp_path / recovery.JOURNAL
    path.write_bytes(MAGIC + encode(1, 1, b"a") + encode(2, 1, b""))
    assert Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")[:] == [
        (b"a", 1, 1), (b"", 2, 1)]


def test_a_torn_tail_warning_names_the_last_entry_by_index(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / recovery.JOURNAL
    path.write_bytes(MAGIC + encode(4, 9, b"a") + b"\x01")
    caplog.set_level(logging.WARNING, "kvstore.node.journal")
    Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")
    assert "after entry 4 (cut short)" in caplog.records[0].getMessage()


def test_a_poisoned_journal_repeats_the_first_reason_and_its_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 2)
    monkeypatch.setattr(os, "fdatasync", io_error)
    with pytest.raises(JournalFailed) as first:
        journal.sync()
    assert isinstance(first.value.__cause__, OSError) and first.value.__cause__.errno == 5
    with pytest.raises(JournalFailed) as later:
        journal.add(b"x", 3, 1)
    assert str(later.value) == str(first.value) == journal.failed


@pytest.mark.parametrize("step", ["snapshot", "compaction", "meta"])
def test_every_fail_stop_keeps_the_os_error_as_its_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    journal = filled(tmp_path, 3)
    (tmp_path / recovery.DUMP).write_bytes(b"snapshot")
    if step == "snapshot":
        monkeypatch.setattr(os, "fsync", io_error)
    else:
        monkeypatch.setattr(os, "replace", io_error)
    with pytest.raises(JournalFailed) as failed:
        journal.setCurrentTerm(2, None) if step == "meta" else journal.deleteEntriesTo(1)
    assert isinstance(failed.value.__cause__, OSError)


def test_creating_a_journal_syncs_it_and_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fsync_calls(monkeypatch)
    Journal.create(str(tmp_path / recovery.JOURNAL))
    assert calls == [str(tmp_path / "raft.journal.tmp"), str(tmp_path)]


def test_a_journal_named_without_a_directory_is_in_the_current_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Journal.create(recovery.JOURNAL)
    journal = Journal.open(recovery.JOURNAL, MetaFile(recovery.META), recovery.DUMP)
    journal.add(b"a", 1, 1)
    journal.clear()  # syncs the directory, here "."
    assert len(journal) == 0


def test_a_crash_during_compaction_leaves_only_the_file_recovery_removes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 3)

    def crash(*_: object) -> None:
        raise SystemExit("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        journal.deleteEntriesTo(1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [
        "raft.journal.tmp"]


@pytest.mark.parametrize("position", [1, 7], ids=["second-entry", "next-to-last"])
def test_a_journal_holding_the_snapshots_entries_anywhere_before_its_end_is_compacted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, position: int) -> None:
    """The snapshot's prev entry at the journal's second position, or its last two entries
    the journal's last two: both are compacted to start at prev."""
    prev, last = position + 1, position + 2
    kept = aligned(tmp_path, 9, (b"command %d" % prev, prev, 2), (b"command %d" % last, last, 2),
                   caplog)
    assert kept == list(range(prev, 10))


def test_a_payload_of_exactly_the_largest_size_is_an_entry(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``MAX_PAYLOAD`` is the largest payload read back, not the first one refused (here 8
    bytes, not 1 GiB, so the record fits in a test)."""
    from kvstore.node import journal as journal_mod
    monkeypatch.setattr(journal_mod, "MAX_PAYLOAD", 8)
    path = tmp_path / recovery.JOURNAL
    path.write_bytes(MAGIC + encode(1, 1, b"8 bytes!") + encode(2, 1, b"nine byte"))
    assert Journal.open(str(path), MetaFile(str(tmp_path / "m")), "")[:] == [(b"8 bytes!", 1, 1)]


# -- a sync on another thread (kvstore.node.sync_thread) ---------------------------------------

def test_a_background_sync_covers_what_was_appended_when_it_was_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 3)
    point = journal.sync_point()
    assert point is not None and point.index == 3 and not journal.dirty
    journal.add(b"command 4", 4, 1)  # after the point: not covered by it
    calls = fsync_calls(monkeypatch)
    journal.synced_in_background(point)
    assert calls == [os.path.realpath(journal.path)] and point.fds == []
    assert journal.synced_index == 3 and journal.dirty
    assert journal.sync_point() is not None and journal.sync_point() is None


def test_nothing_appended_asks_for_no_background_sync(tmp_path: Path) -> None:
    journal = filled(tmp_path, 2)
    journal.sync()
    assert journal.sync_point() is None


def test_a_background_sync_asked_for_before_a_truncation_does_not_cover_the_new_entries(
        tmp_path: Path) -> None:
    """Entries 2 and 3 replaced by others at the same indexes (a conflict with a new leader)
    were written after the sync was asked for: it does not make them durable."""
    journal = filled(tmp_path, 3)
    point = journal.sync_point()
    assert point is not None
    journal.deleteEntriesFrom(1)
    assert journal.synced_index == 0  # entry 1 was never synced either
    journal.add(b"new 2", 2, 2)
    journal.add(b"new 3", 3, 2)
    journal.synced_in_background(point)
    assert journal.synced_index == 0


def test_a_truncation_keeps_what_was_synced_below_it(tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    journal.sync()
    journal.deleteEntriesFrom(2)
    assert journal.synced_index == 2


def test_a_background_sync_asked_for_before_a_compaction_counts_nothing_more(
        tmp_path: Path) -> None:
    journal = filled(tmp_path, 3)
    point = journal.sync_point()
    assert point is not None
    journal.deleteEntriesTo(1)  # the new file is synced: all of it is durable
    journal.add(b"command 4", 4, 1)
    journal.synced_in_background(point)
    assert journal.synced_index == 3


def test_a_failed_background_sync_poisons_the_journal(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 2)
    reasons: list[str] = []
    journal.on_failure = reasons.append
    point = journal.sync_point()
    assert point is not None
    monkeypatch.setattr(os, "fdatasync", io_error)
    with pytest.raises(JournalFailed) as failed:
        journal.synced_in_background(point)
    assert isinstance(failed.value.__cause__, OSError) and failed.value.__cause__.errno == 5
    assert journal.synced_index == 0 and point.fds == []
    assert reasons == [f"fdatasync on {journal.path} failed: [Errno 5] Input/output error"]
    with pytest.raises(JournalFailed):
        journal.add(b"x", 3, 1)


def test_every_truncation_makes_a_new_epoch_not_only_the_first(tmp_path: Path) -> None:
    """A sync asked for after one truncation does not cover entries rewritten by a second."""
    journal = filled(tmp_path, 3)
    journal.deleteEntriesFrom(2)
    journal.add(b"new 3", 3, 2)
    point = journal.sync_point()
    assert point is not None
    journal.deleteEntriesFrom(1)
    journal.add(b"newer 2", 2, 3)
    journal.add(b"newer 3", 3, 3)
    journal.synced_in_background(point)
    assert journal.synced_index == 0


def test_a_compaction_after_a_truncation_does_not_bring_an_old_epoch_back(tmp_path: Path) -> None:
    """The epoch only grows: after a truncation and a compaction it differs from the one a
    sync was asked for in, however the two moved it."""
    journal = filled(tmp_path, 3)
    point = journal.sync_point()
    assert point is not None
    journal.deleteEntriesFrom(1)
    journal.deleteEntriesTo(1)  # the new file is synced: entry 1 is durable
    synced = journal.synced_index
    journal.add(b"new 2", 2, 2)
    journal.add(b"new 3", 3, 2)
    journal.synced_in_background(point)
    assert journal.synced_index == synced < 3


def test_a_compaction_never_brings_back_the_epoch_a_sync_was_asked_for_in(tmp_path: Path) -> None:
    """Not only the first epoch: a sync asked for after one truncation does not count once a
    second truncation and a compaction have dropped what it covered and entries were written
    again at those indexes (its descriptor is the old file's: syncing it syncs nothing new)."""
    journal = filled(tmp_path, 4)
    journal.deleteEntriesFrom(3)  # a first conflict: entries 1-2 kept
    journal.add(b"new 3", 3, 2)
    point = journal.sync_point()
    assert point is not None and point.index == 3
    journal.deleteEntriesFrom(2)  # a second conflict: "new 3" dropped
    journal.deleteEntriesTo(1)  # a compaction: entry 2 alone, in a new synced file
    assert journal.synced_index == 2
    journal.add(b"newer 3", 3, 3)
    journal.synced_in_background(point)
    assert journal.synced_index == 2
    journal._destroy()


def test_a_failed_dup_for_a_background_sync_poisons_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = filled(tmp_path, 2)
    reasons: list[str] = []
    journal.on_failure = reasons.append
    monkeypatch.setattr(os, "dup", io_error)
    with pytest.raises(JournalFailed):
        journal.sync_point()
    assert reasons == [f"dup on {journal.path} failed: [Errno 5] Input/output error"]


def test_io_seconds_adds_up_the_tick_threads_syncs_meta_stores_and_compactions(
        tmp_path: Path) -> None:
    """``io_seconds`` (what ``kvstore.node.gap_causes`` charges to the disk) is the sum of the
    time of each sync, each meta store made on the calling thread and each compaction; a meta
    store on the sync thread (``background``) is not the tick thread's time."""
    journal = filled(tmp_path, 3)
    assert journal.io_seconds == 0.0
    readings = iter(range(100, 200, 3))  # each timed call takes 3 "seconds"
    journal.io_clock = lambda: float(next(readings))
    journal.sync()
    journal.sync()
    assert journal.io_seconds == 6.0
    journal.setCurrentTerm(2, None)  # stored at once, by the calling thread
    assert journal.io_seconds == 9.0
    journal.store_meta(background=True)
    assert journal.io_seconds == 9.0
    journal.deleteEntriesTo(1)
    assert journal.io_seconds == 12.0
    journal._destroy()
