"""The sync thread (``kvstore.node.sync_thread``) on a real journal in a temporary directory,
without a node: what it holds, what it lets through, and in which order.

The rule: a success ``next_node_idx`` claiming the entries up to N leaves only once the journal
is synced up to N; what is sent after a held message waits behind it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.node import quick_disk, recovery, sync_thread
from kvstore.node.journal import Journal
from kvstore.node.meta_file import MetaFile
from kvstore.node.sync_thread import SyncThread, claims
from tests import support

DEADLINE = 5.0


def ack(next_index: int, success: bool = True) -> dict[str, Any]:
    return {"type": "next_node_idx", "next_node_idx": next_index, "reset": False,
            "success": success}


class Wire:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.wakes = 0

    def send(self, node: Any, message: Any) -> None:
        self.sent.append(message)

    def wake(self) -> None:
        self.wakes += 1


def open_journal(tmp_path: Path) -> Journal:
    path = str(tmp_path / recovery.JOURNAL)
    Journal.create(path)
    return Journal.open(path, MetaFile(str(tmp_path / recovery.META)),
                        str(tmp_path / recovery.DUMP))


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Journal, SyncThread, Wire]]:
    path = str(tmp_path / recovery.JOURNAL)
    Journal.create(path)
    journal = Journal.open(path, MetaFile(str(tmp_path / recovery.META)),
                           str(tmp_path / recovery.DUMP))
    wire = Wire()
    syncer = SyncThread(journal, wire.send, wire.wake, Counter())
    yield journal, syncer, wire
    syncer.stop()
    assert not syncer._thread.is_alive(), "stop did not end the sync thread"
    journal._destroy()


def test_only_a_success_acknowledgement_claims_entries() -> None:
    assert claims(ack(8)) == 7
    assert claims(ack(8, success=False)) == 0
    assert claims({"type": "append_entries", "next_node_idx": 8, "success": True}) == 0
    assert claims("not a dict") == 0


def test_an_acknowledgement_waits_for_the_sync_and_what_follows_waits_behind_it(
        parts: tuple[Journal, SyncThread, Wire]) -> None:
    journal, syncer, wire = parts
    journal.add(b"one", 1, 1)
    journal.add(b"two", 2, 1)
    syncer.send("leader", ack(3))
    syncer.send("leader", ack(3, success=False))  # claims nothing, but queued behind
    assert wire.sent == []
    support.wait_for(lambda: journal.synced_index == 2, DEADLINE, "the background sync")
    support.wait_for(lambda: wire.wakes > 0, DEADLINE, "the tick thread to be woken")
    syncer.release()
    assert wire.sent == [ack(3), ack(3, success=False)]
    syncer.send("leader", ack(3))  # nothing new: goes at once
    assert wire.sent[-1] == ack(3) and len(wire.sent) == 3


def test_a_message_that_claims_nothing_goes_at_once_when_nothing_is_held(
        parts: tuple[Journal, SyncThread, Wire]) -> None:
    journal, syncer, wire = parts
    journal.add(b"one", 1, 1)
    syncer.send("leader", ack(2, success=False))
    assert wire.sent == [ack(2, success=False)]


def test_release_sends_only_what_is_synced(parts: tuple[Journal, SyncThread, Wire]) -> None:
    journal, syncer, wire = parts
    journal.add(b"one", 1, 1)
    journal.sync()
    journal.add(b"two", 2, 1)  # not synced: no sync asked for (the test does not ask)
    syncer._held.append(("leader", ack(2)))
    syncer._held.append(("leader", ack(3)))
    syncer.release()
    assert wire.sent == [ack(2)] and len(syncer._held) == 1


def test_the_periodic_meta_store_is_made_on_the_sync_thread(
        parts: tuple[Journal, SyncThread, Wire], monkeypatch: pytest.MonkeyPatch) -> None:
    journal, _, _ = parts
    journal.add(b"one", 1, 1)
    journal.sync()
    io_before = journal.io_seconds
    stored_on: list[str] = []
    real = journal.meta_file.store

    def store(meta: Any) -> None:
        stored_on.append(threading.current_thread().name)
        real(meta)

    monkeypatch.setattr(journal.meta_file, "store", store)
    journal.setRaftCommitIndex(1)
    journal.onOneSecondTimer()
    support.wait_for(lambda: journal.meta_file.stored is not None
                     and journal.meta_file.stored.commit_index == 1, DEADLINE, "the meta store")
    assert stored_on == ["journal-sync"]
    assert journal.io_seconds == io_before  # not the tick thread's time
    journal.setCurrentTerm(2, None)  # a term is stored at once, on the calling thread
    assert stored_on[-1] == threading.current_thread().name


def test_each_held_acknowledgement_is_counted(tmp_path: Path) -> None:
    path = str(tmp_path / recovery.JOURNAL)
    Journal.create(path)
    journal = Journal.open(path, MetaFile(str(tmp_path / recovery.META)),
                           str(tmp_path / recovery.DUMP))
    wire, counters = Wire(), Counter[str]()
    gate = threading.Event()
    journal.synced_in_background = lambda point: gate.wait(DEADLINE)  # type: ignore[method-assign]
    syncer = SyncThread(journal, wire.send, wire.wake, counters)
    try:
        journal.add(b"one", 1, 1)
        syncer.send("leader", ack(2))
        syncer.send("leader", ack(2))
        assert counters["acks_held"] == 2 and wire.sent == []
    finally:
        gate.set()
        syncer.stop()
        journal._destroy()


def test_the_journal_file_is_compacted_on_the_sync_thread(
        parts: tuple[Journal, SyncThread, Wire]) -> None:
    journal, syncer, _ = parts
    for index in range(1, 11):
        journal.add(b"command %d" % index, index, 1)
    journal.sync()
    journal.deleteEntriesTo(7)
    assert [e[1] for e in journal] == [8, 9, 10]  # at once, for PySyncObj
    support.wait_for(lambda: syncer._counters["journal_file_compactions"] == 1, DEADLINE,
                     "the compaction")
    reopened = Journal.open(journal.path, journal.meta_file, journal.snapshot_path)
    try:
        assert reopened[:] == journal[:]
    finally:
        reopened._destroy()
    journal.deleteEntriesTo(1)  # each compaction of the file is counted
    support.wait_for(lambda: syncer._counters["journal_file_compactions"] == 2, DEADLINE,
                     "the second compaction")


def test_syncs_without_a_compaction_compact_nothing(
        parts: tuple[Journal, SyncThread, Wire]) -> None:
    """The sync thread compacts the file only when asked: a sync alone starts no reclaim."""
    journal, syncer, wire = parts
    for index in range(1, 4):
        journal.add(b"command %d" % index, index, 1)
        syncer.send("leader", ack(index + 1))
        support.wait_for(lambda i=index: journal.synced_index == i, DEADLINE, "the sync")
    syncer.release()
    assert len(wire.sent) == 3
    assert syncer._counters["journal_file_compactions"] == 0


def test_a_sync_asked_for_during_a_compaction_waits_for_one_step_not_all(
        parts: tuple[Journal, SyncThread, Wire], monkeypatch: pytest.MonkeyPatch) -> None:
    journal, syncer, wire = parts
    asked = threading.Event()
    synced_before_second_step: list[int] = []

    def reclaim() -> Iterator[None]:
        asked.wait(DEADLINE)
        yield
        synced_before_second_step.append(journal.synced_index)

    monkeypatch.setattr(journal, "reclaim", reclaim)
    journal.add(b"one", 1, 1)
    journal.add(b"two", 2, 1)
    journal.deleteEntriesTo(1)
    syncer.send("leader", ack(3))
    asked.set()
    support.wait_for(lambda: synced_before_second_step, DEADLINE, "the second step")
    assert synced_before_second_step == [2]
    syncer.release()
    assert wire.sent == [ack(3)]


def test_a_directory_is_synced_on_the_sync_thread(
        parts: tuple[Journal, SyncThread, Wire], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    _, syncer, _ = parts
    synced: list[tuple[str, str]] = []
    monkeypatch.setattr(sync_thread, "fsync_path", lambda path: synced.append(
        (path, threading.current_thread().name)))
    syncer.fsync_directory_later(str(tmp_path))
    support.wait_for(lambda: synced, DEADLINE, "the directory sync")
    assert synced == [(str(tmp_path), "journal-sync")]


def test_a_failed_directory_sync_is_logged_and_the_thread_goes_on(
        parts: tuple[Journal, SyncThread, Wire], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    journal, syncer, wire = parts
    syncer.fsync_directory_later(str(tmp_path / "gone"))
    journal.add(b"one", 1, 1)
    syncer.send("leader", ack(2))
    support.wait_for(lambda: journal.synced_index == 1, DEADLINE, "the sync after it")
    assert f"fsync of the directory {tmp_path / 'gone'} failed" in caplog.text


def test_a_meta_store_on_the_sync_thread_never_reads_the_tick_threads_clock(
        parts: tuple[Journal, SyncThread, Wire]) -> None:
    """``io_clock`` reads the tick thread's schedstat, gone once that thread has ended (a node
    stopping): the sync thread's store must not need it."""
    journal, _, _ = parts
    journal.add(b"one", 1, 1)
    journal.sync()

    def gone() -> float:
        raise ProcessLookupError(3, "No such process")
    clock, journal.io_clock = journal.io_clock, gone
    try:
        journal.setRaftCommitIndex(1)
        journal.onOneSecondTimer()
        support.wait_for(lambda: journal.meta_file.stored is not None
                         and journal.meta_file.stored.commit_index == 1, DEADLINE,
                         "the meta store")
    finally:
        journal.io_clock = clock  # the fixture's clean stop syncs on this thread


def test_stop_leaves_behind_a_sync_stuck_on_the_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that stops does not hang on a disk that no longer answers: ``stop`` waits
    ``STOP_WAIT`` for the thread, then returns with the sync still stuck."""
    monkeypatch.setattr(sync_thread, "STOP_WAIT", 0.05)
    path = str(tmp_path / recovery.JOURNAL)
    Journal.create(path)
    journal = Journal.open(path, MetaFile(str(tmp_path / recovery.META)),
                           str(tmp_path / recovery.DUMP))
    wire = Wire()
    syncing, disk_answers = threading.Event(), threading.Event()

    def stuck(point: Any) -> None:
        syncing.set()
        disk_answers.wait(DEADLINE)

    journal.synced_in_background = stuck  # type: ignore[method-assign]
    syncer = SyncThread(journal, wire.send, wire.wake, Counter())
    try:
        journal.add(b"one", 1, 1)
        syncer.send("leader", ack(2))
        assert syncing.wait(DEADLINE), "the sync thread never started its sync"
        journal.add(b"two", 2, 1)
        syncer.request()  # queued behind the stuck sync
        queued = syncer._wanted
        assert queued is not None
        syncer.stop()
        assert syncer._thread.is_alive(), "stop waited for the stuck sync to end"
        assert syncer._thread.daemon, "the stuck thread would keep the process from exiting"
        assert queued.fds == []  # the sync it will never make does not keep its descriptor
        syncer.stop()  # a second stop is harmless
    finally:
        disk_answers.set()
        syncer._thread.join(DEADLINE)
        journal._destroy()


def test_its_counters_are_there_from_the_start(tmp_path: Path) -> None:
    """A node's status shows both counters before the first sync or held message; held
    acknowledgements are counted on from what the node counted before, not from 0."""
    path = str(tmp_path / recovery.JOURNAL)
    Journal.create(path)
    journal = Journal.open(path, MetaFile(str(tmp_path / recovery.META)),
                           str(tmp_path / recovery.DUMP))
    wire, counters = Wire(), Counter({"acks_held": 3, "journal_inline_fsyncs": 2})
    syncer = SyncThread(journal, wire.send, wire.wake, counters)
    try:
        assert counters == {"journal_background_fsyncs": 0, "journal_file_compactions": 0,
                            "acks_held": 3, "journal_inline_fsyncs": 2}
    finally:
        syncer.stop()
        journal._destroy()


def test_it_stores_the_meta_only_when_asked(
        parts: tuple[Journal, SyncThread, Wire]) -> None:
    journal, syncer, wire = parts
    journal.add(b"one", 1, 1)
    syncer.send("leader", ack(2))
    support.wait_for(lambda: journal.synced_index == 1, DEADLINE, "the background sync")
    syncer.stop()  # the thread has run: it has done what it was asked, and only that
    assert journal.meta_file.stored is None


# -- the sync on the tick thread, while the disk is quick (kvstore.node.quick_disk) -------------


class Inline:
    """A sync thread that may sync on the calling thread (here, the test's: the tick thread),
    with a switch for "this node writes a snapshot now"."""

    def __init__(self, tmp_path: Path) -> None:
        self.journal = open_journal(tmp_path)
        self.wire, self.counters = Wire(), Counter[str]()
        self.snapshot_written = False
        self.syncer = SyncThread(self.journal, self.wire.send, self.wire.wake, self.counters,
                                 disk_busy=lambda: self.snapshot_written)

    def close(self) -> None:
        self.syncer.stop()
        self.journal._destroy()


@pytest.fixture
def inline(tmp_path: Path) -> Iterator[Inline]:
    parts = Inline(tmp_path)
    yield parts
    parts.close()


def synced_on(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[str]:
    """The names of the threads that call ``fdatasync`` from now on (each waits ``delay``)."""
    names: list[str] = []
    real = os.fdatasync

    def recorded(fd: int) -> None:
        names.append(threading.current_thread().name)
        time.sleep(delay)  # the injected fault: a slow disk
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recorded)
    return names


def test_with_a_quick_disk_the_acknowledgement_is_synced_on_the_tick_thread_and_sent_at_once(
        inline: Inline, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = synced_on(monkeypatch)
    inline.journal.add(b"one", 1, 1)
    inline.journal.add(b"two", 2, 1)
    inline.syncer.send("leader", ack(3))
    assert inline.wire.sent == [ack(3)]
    assert threads == [threading.current_thread().name]
    assert inline.journal.synced_index == 2 and not inline.journal.dirty
    assert inline.counters["journal_inline_fsyncs"] == 1 and inline.counters["acks_held"] == 0


def test_without_a_disk_check_every_sync_is_left_to_the_sync_thread(
        parts: tuple[Journal, SyncThread, Wire], monkeypatch: pytest.MonkeyPatch) -> None:
    journal, syncer, wire = parts  # made without disk_busy: RaftOptions.quick_syncs_inline off
    threads = synced_on(monkeypatch)
    journal.add(b"one", 1, 1)
    syncer.send("leader", ack(2))
    assert wire.sent == []
    support.wait_for(lambda: journal.synced_index == 1, DEADLINE, "the background sync")
    assert threads == ["journal-sync"]


def test_while_a_snapshot_is_written_the_acknowledgement_waits_for_the_sync_thread(
        inline: Inline, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = synced_on(monkeypatch)
    inline.snapshot_written = True
    inline.journal.add(b"one", 1, 1)
    inline.syncer.send("leader", ack(2))
    assert inline.wire.sent == [] and inline.counters["acks_held"] == 1
    support.wait_for(lambda: inline.wire.wakes > 0, DEADLINE, "the background sync")
    inline.syncer.release()
    assert inline.wire.sent == [ack(2)] and threads == ["journal-sync"]


def test_while_the_sync_thread_is_busy_the_tick_thread_does_not_sync_beside_it(
        inline: Inline, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, inside = threading.Event(), threading.Event()
    real = inline.journal.synced_in_background

    def stuck(point: Any) -> None:
        inside.set()
        gate.wait(DEADLINE)  # the sync thread's disk does not answer yet
        real(point)

    monkeypatch.setattr(inline.journal, "synced_in_background", stuck)
    inline.journal.add(b"one", 1, 1)
    inline.syncer.request()  # the end of a pass asks the sync thread
    assert inside.wait(DEADLINE), "the sync thread never started the sync"
    inline.journal.add(b"two", 2, 1)
    try:
        inline.syncer.send("leader", ack(3))
        assert inline.wire.sent == [] and inline.counters["journal_inline_fsyncs"] == 0
    finally:
        gate.set()
    support.wait_for(lambda: inline.journal.synced_index == 2, DEADLINE, "the syncs")
    inline.syncer.release()
    assert inline.wire.sent == [ack(3)]


def test_after_a_slow_sync_on_the_tick_thread_the_next_ones_go_to_the_sync_thread(
        inline: Inline, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = synced_on(monkeypatch, delay=2 * quick_disk.QUICK_SYNC)
    inline.journal.add(b"one", 1, 1)
    inline.syncer.send("leader", ack(2))  # synced here, slowly
    assert inline.wire.sent == [ack(2)] and inline.syncer.disk.slow_syncs == 1
    inline.journal.add(b"two", 2, 1)
    inline.syncer.send("leader", ack(3))
    assert inline.wire.sent == [ack(2)], "the tick thread synced again after a slow sync"
    support.wait_for(lambda: inline.wire.wakes > 0, DEADLINE, "the background sync")
    inline.syncer.release()
    assert inline.wire.sent == [ack(2), ack(3)]
    assert threads == [threading.current_thread().name, "journal-sync"]


@pytest.mark.parametrize("work", ["a sync", "a meta store", "a compaction asked for",
                                  "a compaction under way", "a directory sync", "busy"])
def test_while_the_sync_thread_has_work_the_tick_thread_leaves_the_sync_to_it(
        inline: Inline, work: str) -> None:
    """Each kind of work the sync thread may have, asked for or under way, keeps the tick thread
    from syncing beside it (held here under the thread's lock, so that it never takes it)."""
    syncer = inline.syncer
    inline.journal.add(b"one", 1, 1)
    with syncer._cond:  # re-entrant: send() takes it again on this thread
        if work == "a sync":
            syncer.request()  # asked for; the thread takes it once the lock is free
        else:
            attribute, value = {
                "a meta store": ("_meta_wanted", True),
                "a compaction asked for": ("_reclaim_wanted", True),
                "a compaction under way": ("_reclaiming", iter(())),
                "a directory sync": ("_directories", {"/nowhere"}), "busy": ("_busy", True),
            }[work]
            before = getattr(syncer, attribute)
            setattr(syncer, attribute, value)
        syncer.send("leader", ack(2))
        assert inline.wire.sent == [] and inline.counters["journal_inline_fsyncs"] == 0
        if work != "a sync":
            setattr(syncer, attribute, before)
    support.wait_for(lambda: inline.wire.wakes > 0, DEADLINE, "the background sync")
    syncer.release()
    assert inline.wire.sent == [ack(2)]
