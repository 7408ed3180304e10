"""``Journal.reclaim``: with a sync thread, a compaction drops entries from the list PySyncObj
indexes at once and leaves them in the file as a dead prefix; the sync thread then copies the
live part aside and renames it over the journal while the tick thread goes on appending.

The rule checked at every step: the file named ``raft.journal`` (the temporary copy is removed
at start-up) restores to a log that ends with the entries the node holds, so a crash at any
point loses nothing; and whatever is appended, truncated or synced in between reaches the file
that wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.node import journal as journal_mod
from kvstore.node.journal import MAGIC, Journal, JournalFailed, encode
from kvstore.node.meta_file import MetaFile


def new_journal(tmp_path: Path, count: int) -> tuple[Journal, list[str]]:
    """A journal of ``count`` entries whose compactions are left to ``reclaim`` (each request
    is recorded)."""
    path = str(tmp_path / "raft.journal")
    Journal.create(path)
    journal = Journal.open(path, MetaFile(str(tmp_path / "raft.meta")), str(tmp_path / "raft.dump"))
    requests: list[str] = []
    journal.reclaim_later = lambda: requests.append("reclaim")
    for index in range(1, count + 1):
        journal.add(b"command %d" % index, index, 1)
    return journal, requests


def on_disk(journal: Journal) -> list[tuple[bytes, int, int]]:
    """What a node restarting now would read from the journal's name."""
    copy = journal.path + ".crashed"
    with open(journal.path, "rb") as f, open(copy, "wb") as out:
        out.write(f.read())
    restored = Journal.open(copy, MetaFile(copy + ".meta"), "")
    try:
        return list(restored[:])
    finally:
        restored._destroy()
        os.unlink(copy)


def restores(journal: Journal) -> bool:
    """The file holds the node's entries as its last ones (a dead prefix before them is what
    ``align_to_snapshot`` drops at start-up)."""
    disk, held = on_disk(journal), list(journal[:])
    return len(disk) >= len(held) and disk[len(disk) - len(held):] == held


def steps(journal: Journal) -> Iterator[int]:
    """Runs the reclaim, yielding the step count after each step (0 before the first)."""
    yield 0
    for count, _ in enumerate(journal.reclaim(), start=1):
        yield count


def reclaim_after(tmp_path: Path, steps_done: int) -> tuple[Journal, Iterator[None]]:
    """A journal of 10 entries, the first 4 compacted, its reclaim ``steps_done`` steps in."""
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(4)
    reclaim = journal.reclaim()
    for _ in range(steps_done):
        next(reclaim)
    return journal, reclaim


def io_error(*args: object) -> None:
    raise OSError(5, "Input/output error")


STEPS = 3
"""Pauses of a reclaim with a dead prefix: after the snapshot sync, after the copy, after the
copy joins the mirror; the rename ends it."""


def test_a_compaction_only_drops_entries_from_the_list(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    journal, requests = new_journal(tmp_path, 10)

    def no_io(*args: object) -> None:
        raise AssertionError("the tick thread compacts without I/O")
    for name in ("fsync", "fdatasync", "replace", "ftruncate", "pwrite"):
        monkeypatch.setattr(os, name, no_io)
    journal.deleteEntriesTo(7)
    monkeypatch.undo()
    assert [e[1] for e in journal] == [8, 9, 10] and requests == ["reclaim"]
    assert [e[1] for e in on_disk(journal)] == list(range(1, 11))
    journal.add(b"command 11", 11, 1)
    assert restores(journal)


def test_a_reclaim_leaves_only_the_live_entries_in_the_file(tmp_path: Path) -> None:
    journal, _ = new_journal(tmp_path, 10)
    journal.sync()
    journal.deleteEntriesTo(7)
    assert list(steps(journal)) == [0, 1, 2, 3]
    assert on_disk(journal) == list(journal[:])
    records = b"".join(encode(i, 1, b"command %d" % i) for i in (8, 9, 10))
    assert Path(journal.path).read_bytes() == MAGIC + records
    assert not os.path.exists(journal.path + ".tmp")
    assert journal.synced_index == 10
    journal.add(b"command 11", 11, 1)  # the offsets follow the new file
    journal.deleteEntriesFrom(2)
    journal.add(b"new 10", 10, 2)
    assert [e[1:] for e in on_disk(journal)] == [(8, 1), (9, 1), (10, 2)]


def test_nothing_dead_is_reclaimed_without_io(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    journal, _ = new_journal(tmp_path, 3)
    monkeypatch.setattr(journal_mod, "fsync_path", lambda path: pytest.fail("synced " + path))
    assert list(steps(journal)) == [0]


@pytest.mark.parametrize("pause", range(STEPS + 1))
def test_appends_at_any_step_reach_the_file_that_wins(tmp_path: Path, pause: int) -> None:
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(6)
    index = 10
    for step in steps(journal):
        assert restores(journal), f"a crash after step {step} loses entries"
        if step == pause:
            for _ in range(3):
                index += 1
                journal.add(b"command %d" % index, index, 1)
    assert on_disk(journal) == list(journal[:])
    assert [e[1] for e in journal] == list(range(7, 14))


@pytest.mark.parametrize("pause", range(STEPS + 1))
def test_a_truncation_at_any_step_reaches_the_file_that_wins(tmp_path: Path, pause: int) -> None:
    """Before the copy is mirrored, a truncation abandons it (what it copied may be gone);
    after, the copy is truncated too."""
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(4)
    for step in steps(journal):
        if step == pause:
            journal.deleteEntriesFrom(3)  # entries 8 to 10 go
            journal.add(b"new 8", 8, 2)
        assert restores(journal), f"a crash after step {step} loses entries"
    assert [e[1:] for e in journal] == [(5, 1), (6, 1), (7, 1), (8, 2)]
    assert not os.path.exists(journal.path + ".tmp")
    if pause in (1, 2):
        assert len(on_disk(journal)) == 8  # abandoned: the dead prefix stays for the next one
    else:
        assert on_disk(journal) == list(journal[:])


@pytest.mark.parametrize("pause", range(STEPS + 1))
def test_a_snapshot_installed_at_any_step_leaves_only_what_follows_it(
        tmp_path: Path, pause: int) -> None:
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(4)
    for step in steps(journal):
        if step == pause:
            journal.clear()
            journal.add(b"command 40", 40, 3)
        assert restores(journal), f"a crash after step {step} loses entries"
    assert on_disk(journal) == [(b"command 40", 40, 3)] == list(journal[:])


def test_a_sync_while_the_copy_is_mirrored_covers_both_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, reclaim = reclaim_after(tmp_path, STEPS)
    journal.add(b"command 11", 11, 1)
    synced: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    journal.sync()
    point = journal.sync_point()
    assert point is None
    journal.add(b"command 12", 12, 1)
    point = journal.sync_point()
    assert point is not None and len(point.fds) == 2
    journal.synced_in_background(point)
    names = [os.path.basename(name) for name in synced]
    assert sorted(names) == ["raft.journal", "raft.journal", "raft.journal.tmp",
                             "raft.journal.tmp"]
    assert journal.synced_index == 12


def test_the_copy_is_synced_before_its_rename_and_the_rename_before_the_old_file_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, reclaim = reclaim_after(tmp_path, STEPS)
    trace: list[str] = []
    real_sync, real_replace, real_fsync_path = os.fdatasync, os.replace, journal_mod.fsync_path
    monkeypatch.setattr(os, "fdatasync", lambda fd: (
        trace.append("sync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))),
        real_sync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (trace.append("rename"), real_replace(a, b)))
    monkeypatch.setattr(journal_mod, "fsync_path",
                        lambda path: (trace.append("sync directory"), real_fsync_path(path)))
    with pytest.raises(StopIteration):
        next(reclaim)
    assert trace == ["sync raft.journal.tmp", "rename", "sync directory"]
    assert len(journal._files) == 1


def test_the_snapshot_sync_covers_a_compaction_made_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start of the live part is read before the snapshot is synced: entries compacted
    meanwhile (by a newer snapshot, whose rename that sync may not cover) stay in the file."""
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(4)
    real = journal_mod.fsync_path

    def newer_snapshot_meanwhile(path: str) -> None:
        if len(journal) == 6:
            journal.deleteEntriesTo(2)
        real(path)
    monkeypatch.setattr(journal_mod, "fsync_path", newer_snapshot_meanwhile)
    list(journal.reclaim())
    assert [e[1] for e in journal] == [7, 8, 9, 10]
    assert [e[1] for e in on_disk(journal)] == [5, 6, 7, 8, 9, 10]


def test_a_journal_closed_during_a_reclaim_stays_whole(tmp_path: Path) -> None:
    for pause in range(STEPS + 1):
        (tmp_path / str(pause)).mkdir()
        journal, _ = new_journal(tmp_path / str(pause), 10)
        journal.deleteEntriesTo(4)
        held = list(journal[:])
        for step in steps(journal):
            if step == pause:
                journal._destroy()
        assert on_disk(journal)[-len(held):] == held
        assert pause == STEPS or not os.path.exists(journal.path + ".tmp")


def open_descriptors() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("pause", range(STEPS + 2))
def test_a_reclaim_left_at_any_step_leaves_no_descriptor_open(tmp_path: Path, pause: int) -> None:
    """A reclaim the sync thread drops (the node stops, the generator is closed) closes its
    copy and its source, and one that ends closes the old file's descriptor; the journal's
    own close with the journal. (``pause`` ``STEPS + 1``: the reclaim runs to its end.)"""
    before = open_descriptors()
    journal, reclaim = reclaim_after(tmp_path, min(pause, STEPS))
    if pause > STEPS:
        assert list(reclaim) == [] and not os.path.exists(journal.path + ".tmp")
    reclaim.close()
    journal._destroy()
    assert open_descriptors() - before == set()


def test_a_failed_sync_of_the_copy_poisons_the_journal_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, reclaim = reclaim_after(tmp_path, STEPS)
    reasons: list[str] = []
    journal.on_failure = reasons.append
    monkeypatch.setattr(os, "fdatasync", io_error)
    with pytest.raises(JournalFailed):
        next(reclaim)
    assert reasons == [f"fdatasync on {journal.path} failed: [Errno 5] Input/output error"]
    monkeypatch.undo()
    assert len(on_disk(journal)) == 10


def test_the_copy_has_the_permissions_of_a_new_journal(tmp_path: Path) -> None:
    journal, _ = new_journal(tmp_path, 10)
    before = os.stat(journal.path).st_mode
    journal.deleteEntriesTo(4)
    list(journal.reclaim())
    assert os.stat(journal.path).st_mode == before


def test_a_file_shorter_than_its_entries_is_not_copied_and_poisons_the_journal(
        tmp_path: Path) -> None:
    """Cut behind the journal's back (no truncation it made): a copy would miss entries."""
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(4)
    reclaim = journal.reclaim()
    next(reclaim)
    os.truncate(journal.path, os.path.getsize(journal.path) - 1)
    next(reclaim)  # the copy stops where the file does; the rest would come under the lock
    with pytest.raises(JournalFailed, match="is shorter than its entries") as failed:
        next(reclaim)
    assert journal.failed == f"{journal.path} is shorter than its entries"
    cause = failed.value.__cause__
    assert isinstance(cause, OSError) and str(cause) == "short read"
    assert len(journal._files) == 1


def failing(name: str, only: object = None) -> object:
    """``os.<name>`` that fails with EIO (only on calls whose second argument is ``only``'s
    complement: ``only`` given, a call passing it goes through)."""
    real = getattr(os, name)

    def call(*args: object) -> object:
        if only is not None and len(args) > 1 and args[1] == only:
            return real(*args)
        raise OSError(5, "Input/output error")
    return call


# (steps run before the failing one, what fails, the name the journal's failure must give)
FAILURES = [
    (0, "dup", "dup"),          # the source's descriptor, at the start
    (1, "open", "create"),      # the temporary copy
    (1, "pwrite", "write"),     # its header
    (1, "pread", "read"),       # the first pass of the copy
    (2, "dup", "dup"),          # the copy joining the mirror
    (3, "replace", "rename"),   # the copy over the journal
]


@pytest.mark.parametrize(("before", "call", "named"), FAILURES,
                         ids=[f"{c}-{n}-step{b}" for b, c, n in FAILURES])
def test_a_failed_call_of_a_reclaim_poisons_the_journal_and_names_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: int, call: str,
        named: str) -> None:
    journal, reclaim = reclaim_after(tmp_path, before)
    monkeypatch.setattr(os, call, failing(call))
    with pytest.raises(JournalFailed):
        next(reclaim)
    monkeypatch.undo()
    assert journal.failed is not None
    assert journal.failed.startswith(f"{named} on {journal.path} failed: [Errno 5]")


def test_a_failed_write_of_the_copy_names_itself(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    journal, reclaim = reclaim_after(tmp_path, 1)
    monkeypatch.setattr(os, "pwrite", failing("pwrite", only=MAGIC))  # the header goes through
    with pytest.raises(JournalFailed):
        next(reclaim)
    monkeypatch.undo()
    assert journal.failed is not None and journal.failed.startswith(f"write on {journal.path}")


def test_a_failed_directory_sync_after_the_rename_names_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, reclaim = reclaim_after(tmp_path, STEPS)
    monkeypatch.setattr(journal_mod, "fsync_path", io_error)
    with pytest.raises(JournalFailed):
        next(reclaim)
    assert journal.failed is not None and journal.failed.startswith(f"fsync on {journal.path}")


def test_a_failed_removal_of_an_abandoned_copy_names_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, reclaim = reclaim_after(tmp_path, 2)
    journal.deleteEntriesFrom(5)  # a truncation: the copy is abandoned
    monkeypatch.setattr(os, "unlink", failing("unlink"))
    with pytest.raises(JournalFailed):
        next(reclaim)
    monkeypatch.undo()
    assert journal.failed is not None and journal.failed.startswith(f"unlink on {journal.path}")


def test_the_first_pass_copies_what_there_was_when_the_reclaim_began(tmp_path: Path) -> None:
    """Entries appended after the reclaim read the journal's end are copied under the lock
    (step 3), never by the unlocked first pass, which could read a record being written."""
    journal, reclaim = reclaim_after(tmp_path, 1)
    journal.add(b"command 11", 11, 1)
    next(reclaim)
    copied = Path(journal.path + ".tmp").read_bytes()
    assert copied == MAGIC + b"".join(encode(i, 1, b"command %d" % i) for i in range(5, 11))
    list(reclaim)
    assert on_disk(journal) == list(journal[:]) and journal[-1][1] == 11


def test_a_second_reclaim_copies_from_the_file_the_first_one_left(tmp_path: Path) -> None:
    """After a reclaim the journal's offsets are shifted against its file: a second compaction,
    a truncation and a reclaim of a file with no dead prefix all work in the file's offsets."""
    journal, _ = new_journal(tmp_path, 10)
    journal.deleteEntriesTo(4)
    list(journal.reclaim())
    journal.deleteEntriesTo(3)  # entries 5-7 dead, 8-10 live
    assert list(steps(journal)) == [0, 1, 2, 3]
    records = b"".join(encode(i, 1, b"command %d" % i) for i in (8, 9, 10))
    assert Path(journal.path).read_bytes() == MAGIC + records
    journal.deleteEntriesFrom(2)  # drops entry 10
    assert Path(journal.path).read_bytes() == MAGIC + records[:-len(encode(10, 1, b"command 10"))]
    inode = os.stat(journal.path).st_ino
    assert list(steps(journal)) == [0], "a file without a dead prefix is left as it is"
    assert os.stat(journal.path).st_ino == inode


def test_a_reclaim_after_everything_was_compacted_leaves_only_the_header(
        tmp_path: Path) -> None:
    journal, _ = new_journal(tmp_path, 5)
    journal.deleteEntriesTo(5)
    assert len(journal) == 0
    list(journal.reclaim())
    assert Path(journal.path).read_bytes() == MAGIC
    journal.add(b"command 6", 6, 1)
    assert [e[1] for e in on_disk(journal)] == [6]
