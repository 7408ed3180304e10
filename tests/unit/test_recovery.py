"""Start-up recovery (``kvstore.node.recovery``): every row of its table, on files the test
writes, one claim per test.

``tests/integration/test_crash_states.py`` damages the files of a real node and restarts it;
these call ``recovery.prepare`` directly on a data directory built byte by byte, so each rule is
checked in milliseconds (and ``make mutate`` can run them against every mutant of the module).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from kvstore.config import CannotRestart
from kvstore.node import dump_file, recovery
from kvstore.node.journal import MAGIC, RECORD, Entry, Journal, encode
from kvstore.node.meta_file import VOTE_UNKNOWN, Meta, MetaFile

WAY_OUT = "must be replaced, not restarted"


def entries(first: int, last: int, term: int = 2) -> list[Entry]:
    return [(b"command %d" % i, i, term) for i in range(first, last + 1)]


def write_journal(data: Path, records: list[Entry]) -> None:
    data.mkdir(exist_ok=True)
    (data / recovery.JOURNAL).write_bytes(
        MAGIC + b"".join(encode(index, term, command) for command, index, term in records))


def write_meta(data: Path, meta: Meta) -> None:
    data.mkdir(exist_ok=True)
    MetaFile(str(data / recovery.META)).store(meta)


def write_dump(data: Path, prev: Entry, last: Entry) -> None:
    """A dump whose last two entries are ``prev`` and ``last`` (what recovery reads of it)."""
    data.mkdir(exist_ok=True)
    meta = {"prev": [prev[0].hex(), prev[1], prev[2]], "last": [last[0].hex(), last[1], last[2]]}
    dump_file.write(str(data / recovery.DUMP), meta, b"the state machine's snapshot")


def stored_meta(data: Path) -> Meta | None:
    return MetaFile(str(data / recovery.META)).load()[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def prepare(data: Path) -> Iterator:  # type: ignore[type-arg]
    """``recovery.prepare(data)``; every journal it returns is closed after the test."""
    opened: list[Journal] = []

    def run() -> Journal:
        journal = recovery.prepare(str(data))
        opened.append(journal)
        return journal

    yield run
    for journal in opened:
        journal._destroy()


def refusal(data: Path) -> str:
    with pytest.raises(CannotRestart) as refused:
        recovery.prepare(str(data))
    message = str(refused.value)
    assert "\n" not in message, "one line"
    assert WAY_OUT in message and str(data) in message, "it names the way out"
    return message


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and r.name == "kvstore.node.recovery"]


def refused_with(data: Path, problem: str) -> None:
    """Refused in one line: the problem, then the way out."""
    assert refusal(data) == f"{problem}; {recovery.way_out(str(data))}"


def test_the_way_out_of_a_refusal_is_to_replace_the_node() -> None:
    assert recovery.way_out("/d") == (
        "this node must be replaced, not restarted (move /d away, then: kv cluster "
        "remove-node ID && kv cluster add-node; or kv member remove, then add a new node)")


# -- new nodes ----------------------------------------------------------------------------------

def test_an_empty_directory_starts_a_new_node_quietly(data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    journal = prepare()
    assert len(journal) == 0
    assert (data / recovery.JOURNAL).read_bytes() == MAGIC
    assert stored_meta(data) == Meta()
    assert warnings(caplog) == []


def test_a_node_seeded_with_only_a_dump_starts_quietly_with_no_lost_vote(
        data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    """``kv snapshot restore`` seeds a data directory with a dump alone: a new node, not one
    that lost its meta file (so no VOTE_UNKNOWN)."""
    write_dump(data, (b"p", 4, 1), (b"l", 5, 1))
    journal = prepare()
    assert len(journal) == 0
    assert stored_meta(data) == Meta()
    assert warnings(caplog) == []


def test_temporary_files_left_by_a_crash_are_removed(data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "kvstore.node.recovery")
    data.mkdir()
    for name in recovery.TEMPORARY:
        (data / name).write_bytes(b"half written")
    prepare()
    assert [name for name in recovery.TEMPORARY if (data / name).exists()] == []
    assert infos(caplog) == [f"removed {name}, left by a crash" for name in recovery.TEMPORARY]


def test_the_temporary_files_are_ours_and_pysyncobjs() -> None:
    """Journal, meta and dump written aside by us; PySyncObj's meta, its dump, and the dump
    a leader is sending (``raft.dump.1.tmp``)."""
    assert recovery.TEMPORARY == ("raft.journal.tmp", "raft.meta.tmp", "raft.journal.meta.tmp",
                                  "raft.dump.tmp", "raft.dump.1.tmp")
    assert (recovery.JOURNAL, recovery.META, recovery.DUMP, recovery.LEGACY_META) == (
        "raft.journal", "raft.meta", "raft.dump", "raft.journal.meta")


# -- the journal --------------------------------------------------------------------------------

def test_a_missing_journal_of_a_node_with_state_is_a_new_empty_log_with_a_warning(
        data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    write_meta(data, Meta(term=4, voted_for="127.0.0.1:1"))
    journal = prepare()
    assert len(journal) == 0 and (data / recovery.JOURNAL).read_bytes() == MAGIC
    assert journal.getCurrentTerm() == 4 and journal.getVotedForNodeId() == "127.0.0.1:1"
    assert warnings(caplog) == [
        f"{data / recovery.JOURNAL} is missing: its name never reached the disk; starting with "
        "an empty log (the node catches up from its peers)"]


@pytest.mark.parametrize("content", [b"", bytes(100), MAGIC[:5]],
                         ids=["empty", "zero-filled", "cut-header"])
def test_a_journal_that_never_reached_the_disk_is_a_new_empty_log(
        data: Path, prepare, content: bytes) -> None:  # type: ignore[no-untyped-def]
    write_meta(data, Meta(term=4))
    (data / recovery.JOURNAL).write_bytes(content)
    journal = prepare()
    assert len(journal) == 0
    assert (data / recovery.JOURNAL).read_bytes() == MAGIC


@pytest.mark.parametrize("content, says", [(b"", "empty"), (bytes(100), "zero-filled or cut short"),
                                           (MAGIC[:5], "zero-filled or cut short")],
                         ids=["empty", "zero-filled", "cut-header"])
def test_a_lost_journal_of_a_node_with_state_is_reported(
        data: Path, prepare, caplog, content: bytes, says: str) -> None:  # type: ignore[no-untyped-def]
    write_meta(data, Meta(term=4))
    (data / recovery.JOURNAL).write_bytes(content)
    prepare()
    assert warnings(caplog) == [
        f"{data / recovery.JOURNAL} is {says}: it never reached the disk; starting with an empty "
        "log (the node catches up from its peers)"]


def test_an_empty_journal_of_a_node_without_state_is_not_reported(
        data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    data.mkdir()
    (data / recovery.JOURNAL).write_bytes(b"")
    prepare()
    assert warnings(caplog) == []


def test_a_journal_with_a_nonzero_byte_after_zeros_is_not_a_lost_journal(data: Path) -> None:
    """Only a journal of zeros throughout is one that never reached the disk."""
    data.mkdir()
    (data / recovery.JOURNAL).write_bytes(bytes((1 << 20) + 10) + b"\x01")
    refused_with(data, f"{data / recovery.JOURNAL} is not a journal (its header is neither "
                 "kvstore's nor PySyncObj's)")


def test_a_torn_tail_is_dropped_and_the_entries_before_it_kept(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, entries(1, 5))
    with open(data / recovery.JOURNAL, "ab") as f:
        f.write(encode(6, 2, b"command 6")[:-3])
    journal = prepare()
    assert journal[:] == entries(1, 5)


def test_a_bad_record_followed_by_a_good_one_is_refused(data: Path) -> None:
    write_journal(data, entries(1, 5))
    raw = bytearray((data / recovery.JOURNAL).read_bytes())
    raw[len(MAGIC) + RECORD.size] ^= 0xFF  # the first record's payload
    (data / recovery.JOURNAL).write_bytes(bytes(raw))
    refused_with(data, f"{recovery.JOURNAL}: the record at offset {len(MAGIC)} fails its "
                 "checksum but a valid record follows it: the disk is damaged, not a write cut "
                 "short")


def test_a_journal_with_an_unknown_header_is_refused(data: Path) -> None:
    data.mkdir()
    (data / recovery.JOURNAL).write_bytes(b"something else entirely")
    refused_with(data, f"{data / recovery.JOURNAL} is not a journal (its header is neither "
                 "kvstore's nor PySyncObj's)")


# -- PySyncObj's format ---------------------------------------------------------------------------

def write_legacy(data: Path, records: list[Entry], term: int, vote: str | None) -> None:
    data.mkdir(exist_ok=True)
    legacy = FileJournal(str(data / recovery.JOURNAL))
    for record in records:
        legacy.add(*record)
    legacy.setCurrentTerm(term, vote)
    legacy._destroy()


def test_a_journal_in_pysyncobjs_format_is_converted(data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    write_legacy(data, entries(1, 6), term=3, vote="127.0.0.1:9")
    journal = prepare()
    assert warnings(caplog) == [
        f"{data / recovery.JOURNAL}: converted 6 entries from PySyncObj's format"]
    assert journal[:] == entries(1, 6)
    assert (data / recovery.JOURNAL).read_bytes().startswith(MAGIC)
    assert Journal.open(str(data / recovery.JOURNAL), MetaFile(str(data / "x")), "")[:] \
        == entries(1, 6), "converted on disk, not only in memory"


def test_pysyncobjs_term_and_vote_are_kept_and_its_meta_file_removed(data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "kvstore.node.recovery")
    write_legacy(data, entries(1, 3), term=3, vote="127.0.0.1:9")
    journal = prepare()
    assert infos(caplog) == [
        f"{data / recovery.META}: term 3 and vote taken from PySyncObj's {recovery.LEGACY_META}"]
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (3, "127.0.0.1:9")
    assert stored_meta(data) == Meta(term=3, voted_for="127.0.0.1:9", commit_index=1)
    assert not (data / recovery.LEGACY_META).exists()


def test_pysyncobjs_commit_index_is_kept(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    data.mkdir()
    legacy = FileJournal(str(data / recovery.JOURNAL))
    for record in entries(1, 6):
        legacy.add(*record)
    legacy.setRaftCommitIndex(5)
    legacy.setCurrentTerm(3, None)
    legacy._destroy()
    assert prepare().getRaftCommitIndex() == 5


def test_a_pysyncobj_meta_file_emptied_by_a_power_loss_counts_as_missing(
        data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    """D9: PySyncObj's meta file is 0 bytes after a power loss; the term comes from the log."""
    write_legacy(data, entries(1, 3, term=6), term=7, vote=None)
    (data / recovery.LEGACY_META).write_bytes(b"")
    journal = prepare()
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (6, VOTE_UNKNOWN)
    assert warnings(caplog)[1] == f"{data / recovery.LEGACY_META} is empty or unreadable (D9)"


def legacy_bytes(data: Path, records: list[Entry]) -> bytearray:
    write_legacy(data, records, term=1, vote=None)
    (data / recovery.LEGACY_META).unlink()
    return bytearray((data / recovery.JOURNAL).read_bytes())


def legacy_record_offsets(raw: bytearray) -> list[int]:
    offsets, offset = [], recovery._LEGACY_FIRST_RECORD
    end = int.from_bytes(raw[recovery._LEGACY_LAST_RECORD_OFFSET:recovery._LEGACY_FIRST_RECORD],
                         "little")
    while offset < end:
        offsets.append(offset)
        offset += int.from_bytes(raw[offset:offset + 4], "little") + 8
    return offsets


def test_a_pysyncobj_journal_is_read_up_to_its_last_record_offset(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """PySyncObj's header says where its records end; bytes after that are not entries."""
    raw = legacy_bytes(data, entries(1, 6))
    offsets = legacy_record_offsets(raw)
    raw[recovery._LEGACY_LAST_RECORD_OFFSET:recovery._LEGACY_FIRST_RECORD] = \
        offsets[4].to_bytes(4, "little")
    (data / recovery.JOURNAL).write_bytes(bytes(raw))
    assert prepare()[:] == entries(1, 4)


def test_a_pysyncobj_journal_is_read_up_to_a_record_cut_short(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """It has no checksums: the records are read while they are consistent, and the last
    record offset may point past the end of a file cut short."""
    raw = legacy_bytes(data, entries(1, 6))
    offsets = legacy_record_offsets(raw)
    (data / recovery.JOURNAL).write_bytes(bytes(raw[:offsets[5] + 10]))
    assert prepare()[:] == entries(1, 5)


def test_a_pysyncobj_record_whose_trailer_disagrees_ends_the_log(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    raw = legacy_bytes(data, entries(1, 6))
    offsets = legacy_record_offsets(raw)
    trailer = offsets[4] - 4  # the size repeated after record 4
    raw[trailer] ^= 0x01
    (data / recovery.JOURNAL).write_bytes(bytes(raw))
    assert prepare()[:] == entries(1, 3)


def test_a_pysyncobj_record_out_of_order_ends_the_log(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    records = [*entries(1, 3, term=2), (b"command 5", 5, 2), (b"command 6", 6, 2)]
    write_legacy(data, records, term=2, vote=None)
    assert prepare()[:] == entries(1, 3)


def test_a_pysyncobj_record_with_an_older_term_ends_the_log(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    records = [*entries(1, 3, term=2), (b"command 4", 4, 1)]
    write_legacy(data, records, term=2, vote=None)
    assert prepare()[:] == entries(1, 3)


def test_a_pysyncobj_record_too_small_to_hold_its_index_and_term_ends_the_log(
        data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    raw = legacy_bytes(data, entries(1, 4))
    offsets = legacy_record_offsets(raw)
    raw[offsets[2]:offsets[2] + 4] = (15).to_bytes(4, "little")
    (data / recovery.JOURNAL).write_bytes(bytes(raw))
    assert prepare()[:] == entries(1, 2)


def test_a_pysyncobj_journal_cut_inside_its_header_converts_to_an_empty_log(
        data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    raw = legacy_bytes(data, entries(1, 4))
    (data / recovery.JOURNAL).write_bytes(bytes(raw[:recovery._LEGACY_FIRST_RECORD - 1]))
    assert len(prepare()) == 0


# -- term and vote ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "empty", "checksum"])
def test_a_lost_meta_file_restarts_at_the_logs_last_term_with_no_vote_in_it(
        data: Path, prepare, caplog, damage: str) -> None:  # type: ignore[no-untyped-def]
    """Raft's vote must survive; when it did not, the node takes the term of its last entry
    and acts as if it voted in it, so it cannot vote twice in that term."""
    write_journal(data, [*entries(1, 3, term=2), *entries(4, 5, term=6)])
    if damage != "missing":
        write_meta(data, Meta(term=9, voted_for="127.0.0.1:1"))
        raw = (data / recovery.META).read_bytes()
        (data / recovery.META).write_bytes(b"" if damage == "empty" else raw.replace(b"9", b"8"))
    journal = prepare()
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (6, VOTE_UNKNOWN)
    assert stored_meta(data) == Meta(term=6, voted_for=VOTE_UNKNOWN), "and stored"
    why = {"missing": "missing", "empty": "empty", "checksum": "fails its checksum"}[damage]
    assert warnings(caplog) == [
        f"{data / recovery.META} is {why}: term and vote are lost. Restarting at the term of the "
        "last entry (6), granting no vote in it; a vote cast in a later term is forgotten"]


def test_a_lost_meta_file_with_an_empty_log_takes_the_snapshots_term(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_dump(data, (b"p", 8, 4), (b"l", 9, 5))
    (data / recovery.JOURNAL).write_bytes(b"")
    journal = prepare()
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (5, VOTE_UNKNOWN)


def test_the_term_recovered_is_the_latest_of_log_and_snapshot(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, entries(1, 6, term=3))
    write_dump(data, (b"p", 3, 3), (b"l", 4, 7))
    assert prepare().getCurrentTerm() == 7


def test_a_stored_meta_file_is_believed(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, entries(1, 3))
    write_meta(data, Meta(term=9, voted_for="127.0.0.1:1", commit_index=2))
    journal = prepare()
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (9, "127.0.0.1:1")
    assert journal.getRaftCommitIndex() == 2


def test_a_commit_index_beyond_the_log_is_capped_at_its_last_entry(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """PySyncObj replays committed entries at start-up: it must not believe it committed
    entries the journal lost."""
    write_journal(data, entries(1, 3))
    write_meta(data, Meta(term=2, commit_index=7))
    assert prepare().getRaftCommitIndex() == 3


def test_a_commit_index_at_the_logs_end_is_kept(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, entries(1, 3))
    write_meta(data, Meta(term=2, commit_index=3))
    assert prepare().getRaftCommitIndex() == 3


def test_a_commit_index_is_not_capped_when_a_snapshot_covers_it(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, entries(4, 6))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    write_meta(data, Meta(term=2, commit_index=9))
    assert prepare().getRaftCommitIndex() == 9


# -- the snapshot ---------------------------------------------------------------------------------

def test_a_journal_compacted_after_its_snapshot_restarts(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """PySyncObj keeps a journal that starts with the snapshot's last two entries."""
    write_journal(data, entries(4, 9))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    write_meta(data, Meta(term=2))
    assert prepare()[:] == entries(4, 9)


@pytest.mark.parametrize("damage, says", [("flip", "fails its checksum"),
                                          ("short", "is empty or cut short")])
def test_a_damaged_dump_is_refused_when_the_journal_no_longer_holds_what_it_covers(
        data: Path, damage: str, says: str) -> None:
    write_journal(data, entries(4, 9))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    raw = bytearray((data / recovery.DUMP).read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[:len(dump_file.MAGIC) + 31]
    (data / recovery.DUMP).write_bytes(bytes(raw))
    refused_with(data, f"{data / recovery.DUMP} {says} and the journal no longer holds the "
                 "entries it covers")


def test_a_dump_damaged_in_its_checksum_is_refused(data: Path) -> None:
    write_journal(data, entries(4, 9))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    raw = bytearray((data / recovery.DUMP).read_bytes())
    raw[-1] ^= 0x01
    (data / recovery.DUMP).write_bytes(bytes(raw))
    assert "fails its checksum" in refusal(data)


def test_a_dump_of_exactly_its_magic_and_checksum_is_checked_not_refused_as_short(
        data: Path) -> None:
    write_journal(data, entries(4, 9))
    data.joinpath(recovery.DUMP).write_bytes(dump_file.MAGIC + bytes(32))
    assert "fails its checksum" in refusal(data)


def test_a_damaged_dump_is_set_aside_when_the_journal_starts_at_entry_one(
        data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, entries(1, 9))
    write_meta(data, Meta(term=2))
    (data / recovery.DUMP).write_bytes(dump_file.MAGIC + bytes(100))
    journal = prepare()
    assert journal[:] == entries(1, 9)
    assert not (data / recovery.DUMP).exists()
    assert (data / "raft.dump.damaged").read_bytes() == dump_file.MAGIC + bytes(100)
    assert warnings(caplog) == [
        f"{data / recovery.DUMP} fails its checksum; the journal holds every entry from the "
        "first, so the node rebuilds its state from it (the dump is kept as "
        f"{data / recovery.DUMP}.damaged)"]


@pytest.mark.parametrize("journal", ["missing", "header-only", "starts-at-2"])
def test_a_damaged_dump_is_refused_unless_a_journal_starts_at_entry_one(
        data: Path, journal: str) -> None:
    data.mkdir()
    write_meta(data, Meta(term=2))
    if journal == "header-only":
        write_journal(data, [])
    elif journal == "starts-at-2":
        write_journal(data, entries(2, 9))
    (data / recovery.DUMP).write_bytes(dump_file.MAGIC + bytes(100))
    assert "fails its checksum" in refusal(data)


def test_a_damaged_dump_is_refused_when_the_journal_is_not_ours(data: Path) -> None:
    """Whether a journal starts at entry 1 is read from our format only."""
    data.mkdir()
    record = encode(1, 1, b"x")
    (data / recovery.JOURNAL).write_bytes(b"X" * len(MAGIC) + record)
    (data / recovery.DUMP).write_bytes(dump_file.MAGIC + bytes(100))
    assert "fails its checksum" in refusal(data)


def test_a_missing_dump_with_a_compacted_journal_is_refused(data: Path) -> None:
    write_journal(data, entries(4, 9))
    write_meta(data, Meta(term=2))
    refused_with(data, f"{data / recovery.DUMP} is missing but {data / recovery.JOURNAL} starts "
                 "at entry 4: the snapshot of the entries before it is gone")


def test_a_journal_that_starts_after_its_snapshot_is_refused(data: Path) -> None:
    """A gap: the entries between the snapshot and the journal's first are gone."""
    write_journal(data, entries(7, 9))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    write_meta(data, Meta(term=2))
    refused_with(data, f"{data / recovery.JOURNAL} starts at entry 7, after the snapshot's last "
                 "entries (4, 5): entries in between are missing")


def test_a_journal_with_nothing_beyond_its_snapshot_is_kept(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """Its entries end at the snapshot's last: PySyncObj replaces them with the snapshot's
    two, and nothing is lost, so there is nothing to refuse."""
    write_journal(data, entries(4, 4))
    write_dump(data, (b"command 3", 3, 2), (b"command 4", 4, 2))
    write_meta(data, Meta(term=2))
    assert prepare()[:] == entries(4, 4)


def test_a_journal_starting_just_after_its_snapshot_is_refused(data: Path) -> None:
    """PySyncObj keeps a journal only if it starts with the snapshot's last two entries; it
    would clear this one and lose entries 6-9, which the node may have acknowledged."""
    write_journal(data, entries(6, 9))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    write_meta(data, Meta(term=2))
    refused_with(data, f"{data / recovery.JOURNAL} starts at entry 6, after the snapshot's last "
                 "entries (4, 5): entries in between are missing")


def test_a_snapshot_renamed_before_the_journal_was_compacted_is_compacted_now(
        data: Path, prepare, caplog) -> None:  # type: ignore[no-untyped-def]
    """D12: PySyncObj keeps the journal only if its first two entries are the snapshot's last
    two; a crash between the rename and the compaction left earlier entries before them."""
    write_journal(data, entries(1, 9))
    write_dump(data, (b"command 4", 4, 2), (b"command 5", 5, 2))
    write_meta(data, Meta(term=2))
    journal = prepare()
    assert journal[:] == entries(4, 9)
    assert any("not compacted" in w for w in warnings(caplog))


def test_legacy_meta_is_read_without_our_meta_file(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """A pickle of PySyncObj's own meta in our own data directory (never a peer's bytes)."""
    write_journal(data, entries(1, 3))
    (data / recovery.LEGACY_META).write_bytes(pickle.dumps(
        {"currentTerm": 5, "votedForNodeId": "127.0.0.1:2", "raftCommitIndex": 2}))
    journal = prepare()
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (5, "127.0.0.1:2")
    assert journal.getRaftCommitIndex() == 2


def test_a_pysyncobj_record_with_an_empty_command_is_converted(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """A record's size counts its index and term (16 bytes) and its command, which may be
    empty."""
    records = [(b"", 1, 1), (b"command 2", 2, 1)]
    write_legacy(data, records, term=1, vote=None)
    assert prepare()[:] == records


def test_pysyncobjs_meta_without_its_fields_is_its_defaults(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """PySyncObj's own defaults: term 0, no vote, commit index 1."""
    write_journal(data, entries(1, 3))
    (data / recovery.LEGACY_META).write_bytes(pickle.dumps({}))
    journal = prepare()
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId(),
            journal.getRaftCommitIndex()) == (0, None, 1)


# -- found by mutating this module (``make mutate`` with it in ``only_mutate``) -----------------

@pytest.mark.parametrize("journal", ["missing", "ours", "pysyncobjs", "empty"])
def test_the_journal_syncs_the_nodes_snapshot_before_forgetting_entries(
        data: Path, prepare, monkeypatch: pytest.MonkeyPatch, journal: str) -> None:  # type: ignore[no-untyped-def]
    """However start-up found the journal, the one it hands PySyncObj knows which snapshot
    must be durable before a compaction or a clear (D13)."""
    write_meta(data, Meta(term=2))
    if journal == "ours":
        write_journal(data, entries(1, 3))
    elif journal == "pysyncobjs":
        write_legacy(data, entries(1, 3), term=2, vote=None)
    elif journal == "empty":
        (data / recovery.JOURNAL).write_bytes(b"")
    opened = prepare()
    write_dump(data, (b"p", 1, 1), (b"l", 2, 1))
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd))[1])
    opened.clear()
    assert synced[:2] == [str(data / recovery.DUMP), str(data)]


def test_the_term_recovered_is_that_of_the_logs_last_entry(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    write_journal(data, [*entries(1, 3, term=2), (b"command 4", 4, 5), (b"command 5", 5, 6)])
    assert prepare().getCurrentTerm() == 6


def test_a_journal_without_a_dump_must_start_at_entry_one(data: Path) -> None:
    write_journal(data, entries(2, 4))
    write_meta(data, Meta(term=2))
    refused_with(data, f"{data / recovery.DUMP} is missing but {data / recovery.JOURNAL} starts "
                 "at entry 2: the snapshot of the entries before it is gone")


def test_a_pysyncobj_journal_cut_inside_a_records_size_ends_before_it(data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    raw = legacy_bytes(data, entries(1, 6))
    offsets = legacy_record_offsets(raw)
    (data / recovery.JOURNAL).write_bytes(bytes(raw[:offsets[5] + 2]))
    assert prepare()[:] == entries(1, 5)


def test_a_pysyncobj_journal_cut_inside_a_records_trailer_ends_before_it(
        data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    raw = legacy_bytes(data, entries(1, 6))
    offsets = legacy_record_offsets(raw)
    records_end = int.from_bytes(
        raw[recovery._LEGACY_LAST_RECORD_OFFSET:recovery._LEGACY_FIRST_RECORD], "little")
    (data / recovery.JOURNAL).write_bytes(bytes(raw[:records_end - 2]))
    assert offsets[5] < records_end - 2
    assert prepare()[:] == entries(1, 5)


def test_a_crash_while_converting_pysyncobjs_journal_leaves_a_file_recovery_removes(
        data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_legacy(data, entries(1, 3), term=2, vote=None)

    def crash(*_: object) -> None:
        raise SystemExit("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        recovery.prepare(str(data))
    left = [p.name for p in data.iterdir() if p.name.endswith(".tmp")]
    assert left == ["raft.journal.tmp"] and set(left) <= set(recovery.TEMPORARY)


def test_a_pysyncobj_journal_whose_end_is_past_2_gib_is_read_to_the_end_of_the_file(
        data: Path, prepare) -> None:  # type: ignore[no-untyped-def]
    """The header's end of the records is unsigned: a damaged one that points past the file
    (here 0xFFFFFFF0, negative if read as signed) ends the records at the end of the file."""
    raw = legacy_bytes(data, entries(1, 3))
    raw[recovery._LEGACY_LAST_RECORD_OFFSET:recovery._LEGACY_FIRST_RECORD] = \
        (0xFFFFFFF0).to_bytes(4, "little")
    (data / recovery.JOURNAL).write_bytes(bytes(raw))
    assert prepare()[:] == entries(1, 3)
