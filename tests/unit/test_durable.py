"""The durable mode (``kvstore.node.durable``): what a node vouches for is on disk when it says so.

Raft (thesis 3.8, 10.2.1): a server stores its log entries, term and vote on stable storage
before it answers a message that relies on them. Each test drives one real node message by
message (``tests/unit/raft_harness.py``) and looks, from outside the node's code, at the files
it wrote: ``tests.support.dirty_pages`` asks the kernel how many of a file's pages are still only
in memory. A process crash keeps those pages; a power loss does not. (Simulating the power loss
itself is a separate piece of work, a file system that drops what was never synced.)

Each test also runs on a node without ``fsync``, marked ``xfail(strict=True, raises=NotOnDisk)``:
there the same check must fail, and only on the durability assertions. That shows the check can
fail, and that it is the durable mode which makes it pass.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kvstore.node import OutcomeUnknown, durable
from kvstore.node.meta_file import MetaFile
from kvstore.node.raft_node import RaftNode, RaftOptions
from kvstore.node.recovery import META
from kvstore.state_machine import StateMachine
from tests.support import dirty_pages, free_port, why_dirty_pages_cannot_tell
from tests.unit.raft_harness import (
    FAST, LAST, Harness, append, harnesses, next_node_idx, wait_for)


SLOW_SYNC_DEADLINE = 10.0
"""How long the slow disk of a test holds a sync at most (the test lets it go much sooner)."""


class NotOnDisk(AssertionError):
    """A durability assertion failed (see ``on_disk_rule``)."""


@contextmanager
def on_disk_rule(rule: str) -> Iterator[None]:
    try:
        yield
    except AssertionError as exc:
        raise NotOnDisk(f"{rule}: {exc}") from exc


DURABLE = pytest.param(True, id="fsync")
NOT_DURABLE = pytest.param(False, id="no-fsync", marks=pytest.mark.xfail(
    strict=True, raises=NotOnDisk,
    reason="without --fsync the journal and the term stay in the page cache for a while"))


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every file or directory ``os.fsync`` or ``os.fdatasync`` is called on, in
    order (a record of the calls: the real sync still runs)."""
    calls: list[str] = []

    def recording(real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            calls.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)
        return sync

    monkeypatch.setattr(os, "fsync", recording(os.fsync))
    monkeypatch.setattr(os, "fdatasync", recording(os.fdatasync))
    return calls


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    reason = why_dirty_pages_cannot_tell(tmp_path)
    if reason:
        pytest.skip(reason)
    with harnesses(tmp_path) as make:
        yield lambda fsync, peers=1, **options: make(fsync=fsync, peers=peers, **options)


def journal(h: Harness) -> Path:
    return Path(h.node._n_options.data_dir) / "raft.journal"


def kind(message: Any) -> Any:
    return message.get("type") if type(message) is dict else None


@pytest.mark.parametrize("inline", [True, False], ids=["quick-disk-inline", "sync-thread"])
@pytest.mark.parametrize("fsync", [DURABLE, NOT_DURABLE])
def test_a_follower_acknowledges_only_entries_that_are_on_disk(
        make_harness: Callable[..., Harness], fsync: bool, inline: bool) -> None:
    """A follower's success reply makes the leader count its copy toward a commit: when the
    reply leaves, the entries it acknowledges must be on disk (no dirty page in the journal).
    The end-of-tick flush comes too late for that: the reply left before it. (The reply is
    synced on the tick thread while the disk is quick, ``kvstore.node.quick_disk``, or waits
    for the sync thread, ``kvstore.node.sync_thread``: both ways are checked.)"""
    h = make_harness(fsync, quick_syncs_inline=inline)
    h.wire.probe = lambda m: dirty_pages(journal(h)) if kind(m) == "next_node_idx" else None

    h.follow(entries_term=1, commit=1)
    # (Its reply first: were the next entries written while it waits for its sync, their pages
    # would be dirty when it leaves, though it does not claim them.)
    wait_for(lambda: h.replies()[-1:] == [next_node_idx(LAST + 1, success=True, reset=False)],
             "the follower's reply to the set-up")
    h.receive(append(1, prev=(LAST, 1), entries=range(LAST + 1, LAST + 3), commit=1))

    def sent() -> list[tuple[Any, Any]]:
        return [(m, dirty) for m, dirty in h.wire.probed if kind(m) == "next_node_idx"]

    wait_for(lambda: h.on_tick(lambda: len(sent()) >= 2), "the follower's reply")
    acks = h.on_tick(sent)
    assert [m["next_node_idx"] for m, _ in acks] == [LAST + 1, LAST + 3]
    with on_disk_rule("a follower's acknowledged entries are on disk when it acknowledges"):
        assert [dirty for _, dirty in acks] == [0, 0]


def test_a_follower_with_a_quick_disk_syncs_on_its_tick_thread(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """While the disk is quick and no snapshot is written, the sync an acknowledgement waits
    for is made on the tick thread (``kvstore.node.quick_disk``), not handed to the sync
    thread and back; with ``quick_syncs_inline`` off, on the sync thread."""
    threads: list[str] = []
    real = os.fdatasync

    def recorded(fd: int) -> None:
        threads.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recorded)
    for inline, syncing_thread in ((True, "raft-tick-"), (False, "journal-sync")):
        h = make_harness(True, quick_syncs_inline=inline)
        h.follow(entries_term=1, commit=1)
        wait_for(lambda: h.replies()[-1:] == [next_node_idx(LAST + 1, success=True, reset=False)],
                 "the follower's reply to the set-up")
        threads.clear()
        h.receive(append(1, prev=(LAST, 1), entries=range(LAST + 1, LAST + 3), commit=1))
        wait_for(lambda: h.replies()[-1:] == [next_node_idx(LAST + 3, success=True, reset=False)],
                 "the follower's reply")
        assert threads and all(t.startswith(syncing_thread) for t in threads), threads
        assert (h.node.counters["journal_inline_fsyncs"] > 0) == inline


def propose_entry_3(h: Harness) -> None:
    """Hands the leader (whose no-op is entry 2) entry 3, and waits until it sent it to every
    peer."""
    with pytest.raises(OutcomeUnknown):
        h.node.propose(b"entry", timeout=0.0)
    wait_for(lambda: h.on_tick(lambda: all(
        any(kind(m) == "append_entries" and any(e[1] == 3 for e in m.get("entries") or [])
            for m in wire.sent) for wire in h.wires)), "the leader to send entry 3")


@contextmanager
def slow_sync_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The sync thread's ``fdatasync`` waits (for the event it yields, set at the end)."""
    disk = threading.Event()
    real = os.fdatasync

    def slow(fd: int) -> None:
        if threading.current_thread().name == "journal-sync":
            disk.wait(SLOW_SYNC_DEADLINE)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    try:
        yield disk
    finally:
        disk.set()


@pytest.mark.parametrize("fsync", [DURABLE, NOT_DURABLE])
def test_a_leader_counts_its_own_copy_toward_a_commit_only_once_it_is_on_disk(
        make_harness: Callable[[bool], Harness], fsync: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader counts its own copy toward every commit (here, of two voters, it must). Its
    journal is synced on the sync thread (``kvstore.node.sync_thread``): while that sync waits
    for the disk, the follower's acknowledgement of entry 3 commits nothing, the tick loop keeps
    passing, and once the sync is done entry 3 commits, with the journal clean."""
    h = make_harness(fsync)
    h.lead()  # its no-op is entry 2
    with slow_sync_thread(monkeypatch) as disk:
        propose_entry_3(h)
        h.reply(next_node_idx(4, success=True, reset=False))
        ticks = h.node.counters["ticks"]
        wait_for(lambda: h.node.counters["ticks"] > ticks + 10, "the tick loop to keep passing")
        with on_disk_rule("the leader's copy counts only once it is on disk"):
            assert h.on_tick(lambda: h.node.raftCommitIndex) < 3
        disk.set()
        wait_for(lambda: h.node.raftCommitIndex >= 3, "entry 3 to commit")
    assert h.node.counters["commit_before_flush"] == 0
    assert dirty_pages(journal(h)) == 0


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_term_and_vote_are_on_disk_before_the_node_asks_for_votes(
        make_harness: Callable[[bool], Harness], fsync: bool, fsynced: list[str]) -> None:
    """Raft (thesis 3.8, Figure 3.1): currentTerm and votedFor are on stable storage before a
    server answers or sends a message. A candidate that asked for votes, crashed and lost its
    vote could vote again in the same term. The meta file is written anew and renamed into
    place (``kvstore.node.meta_file``): the file's data must be on disk, and so must the rename
    (an fsync of the directory, which only a record of the fsync calls shows). This holds with
    ``--no-fsync`` too: the mode gives up the journal's durability, never the vote's (PySyncObj
    fsynced neither: D9)."""
    h = make_harness(fsync)
    meta = str(Path(h.node._n_options.data_dir) / META)

    def at_vote_request(message: Any) -> Any:
        if kind(message) != "request_vote":
            return None
        stored, _ = MetaFile(meta).load()
        assert stored is not None, "no valid meta file when the vote request left"
        return (message["term"], stored.term, stored.voted_for, dirty_pages(meta),
                list(fsynced))

    h.wire.probe = at_vote_request
    h.lead()

    requests = [seen for m, seen in h.wire.probed if kind(m) == "request_vote"]
    assert requests, "the node never asked for votes"
    term, stored_term, stored_vote, dirty, fsynced_then = requests[0]
    assert (stored_term, stored_vote) == (term, h.node.selfNode.id)  # it voted for itself
    with on_disk_rule("term and vote are on disk before the node asks for votes"):
        assert dirty == 0
        assert fsynced_then[-2:] == [os.path.realpath(meta + ".tmp"),  # written aside, renamed
                                     os.path.realpath(h.node._n_options.data_dir)]


def journal_fsyncs(h: Harness, fsynced: list[str]) -> int:
    """fsyncs of the journal file (the sync thread syncs a duplicate descriptor: same path)."""
    return fsynced.count(os.path.realpath(journal(h)))


def test_one_flush_per_write_and_none_when_nothing_was_written(
        make_harness: Callable[[bool], Harness], fsynced: list[str]) -> None:
    """The durable mode costs one fsync of the journal per batch of new entries (group commit
    amortises it), none on a tick or an acknowledgement that stored nothing; and
    ``journal_fsyncs`` (a lone node's), ``journal_inline_fsyncs`` (a follower's on its tick
    thread) and ``journal_background_fsyncs`` count exactly those."""
    h = make_harness(True)
    h.follow(entries_term=1, commit=1)
    wait_for(lambda: h.replies()[-1:] == [next_node_idx(LAST + 1, success=True, reset=False)],
             "the follower's reply to the set-up (its sync done)")
    after_setup = journal_fsyncs(h, fsynced)

    h.receive(append(1, prev=(LAST, 1), entries=range(LAST + 1, LAST + 3), commit=1))
    wait_for(lambda: h.replies()[-1:] == [next_node_idx(LAST + 3, success=True, reset=False)],
             "the follower's reply")
    assert journal_fsyncs(h, fsynced) == after_setup + 1
    replies = len(h.replies())
    h.receive(append(1, prev=(LAST + 2, 1), entries=[], commit=1))  # a heartbeat
    for _ in range(5):
        h.on_tick(lambda: None)  # ticks with nothing new

    assert h.last_reply() == next_node_idx(LAST + 3, success=True, reset=False)
    assert len(h.replies()) == replies + 1  # the heartbeat's reply, not held
    assert journal_fsyncs(h, fsynced) == after_setup + 1
    counters = h.node.counters
    assert (counters["journal_fsyncs"] + counters["journal_inline_fsyncs"]
            + counters["journal_background_fsyncs"] == journal_fsyncs(h, fsynced))


def test_a_leaders_append_leaves_before_its_flush(make_harness: Callable[[bool], Harness],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader writes its log in parallel with replication (Raft thesis 10.2.1): its append
    goes out while its journal is still dirty (here its sync thread is held so that the check
    does not race it), so the followers' fsyncs and its own overlap."""
    h = make_harness(True)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)  # nothing is ever synced
    h.wire.probe = lambda m: dirty_pages(journal(h)) if kind(m) == "append_entries" else None
    h.lead()
    with pytest.raises(OutcomeUnknown):
        h.node.propose(b"entry", timeout=0.0)
    wait_for(lambda: h.on_tick(lambda: any(
        kind(m) == "append_entries" and any(e[1] == 3 for e in m.get("entries") or [])
        for m, _ in h.wire.probed)), "the leader to send entry 3")

    dirty_when_sent = next(dirty for m, dirty in h.wire.probed if kind(m) == "append_entries"
                           and any(e[1] == 3 for e in m.get("entries") or []))
    assert dirty_when_sent > 0


def test_the_order_check_counts_a_commit_beyond_what_the_leader_flushed(
        make_harness: Callable[[bool], Harness]) -> None:
    """``commit_before_flush`` is the mode's own alarm: at the end of each tick it counts a
    commit index past what a majority holds durably, which the commit fence prevents
    (``test_a_leader_counts_its_own_copy_toward_a_commit_only_once_it_is_on_disk`` checks it
    from outside). To see that the alarm works, a tick is shown such a state:
    its commit index is set one past the flushed log before the tick's end, and put back after."""
    h = make_harness(True)
    h.lead()
    node = h.node
    flushed = h.on_tick(lambda: node.internals.raft_log[-1][1])
    real_commit = h.on_tick(lambda: node.raftCommitIndex)

    def put_back() -> None:
        node._SyncObj__raftCommitIndex = real_commit  # after the mode's check in this tick

    node.add_tick_hook(put_back)
    for _ in range(2):
        h.on_tick(lambda: setattr(node, "_SyncObj__raftCommitIndex", flushed + 1))
    assert h.on_tick(lambda: node.raftCommitIndex) == real_commit
    assert node.counters["commit_before_flush"] == 2


def test_a_slow_sync_holds_the_acknowledgement_while_the_tick_loop_keeps_passing(
        make_harness: Callable[[bool], Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower's sync runs on its own thread (``kvstore.node.sync_thread``; always, with
    ``quick_syncs_inline`` off): while the disk is slow (here: the sync thread's fdatasync waits
    for the test), the tick loop keeps passing and reading messages, and the reply that claims
    the new entries waits for the sync. A heartbeat received meanwhile is handled; its reply
    queues behind the held one."""
    h = make_harness(True, quick_syncs_inline=False)
    h.follow(entries_term=1, commit=1)
    wait_for(lambda: h.replies()[-1:] == [next_node_idx(LAST + 1, success=True, reset=False)],
             "the follower's reply to the set-up")
    h.wire.probe = lambda m: dirty_pages(journal(h)) if kind(m) == "next_node_idx" else None
    replies = len(h.replies())
    with slow_sync_thread(monkeypatch):
        h.receive(append(1, prev=(LAST, 1), entries=range(LAST + 1, LAST + 3), commit=1))
        ticks = h.node.counters["ticks"]
        h.receive(append(1, prev=(LAST + 2, 1), entries=[], commit=2))  # a heartbeat
        wait_for(lambda: h.node.counters["ticks"] > ticks + 10, "the tick loop to keep passing")
        assert h.on_tick(lambda: h.node.raftCommitIndex) == 2  # the heartbeat was handled
        assert len(h.replies()) == replies, "a reply left before its entries were synced"
    wait_for(lambda: len(h.replies()) == replies + 2, "the held replies")
    assert h.replies()[replies:] == [next_node_idx(LAST + 3, success=True, reset=False)] * 2
    assert [dirty for m, dirty in h.on_tick(lambda: list(h.wire.probed))] == [0, 0]


def test_the_leaders_syncs_run_on_the_sync_thread_and_are_counted(
        make_harness: Callable[[bool], Harness], fsynced: list[str]) -> None:
    """The leader's tick thread never syncs its journal (behind a dump being written, that
    took it 95-130 ms); the sync thread does, and ``journal_background_fsyncs`` counts each."""
    h = make_harness(True)
    on_tick_thread: list[str] = []
    h.node.add_tick_hook(lambda: on_tick_thread.extend(fsynced))  # (read on the tick thread)
    h.lead()  # its no-op is entry 2
    with pytest.raises(OutcomeUnknown):
        h.node.propose(b"entry", timeout=0.0)  # entry 3
    wait_for(lambda: h.on_tick(lambda: h.node.internals.raft_log.synced_index) >= 3,
             "the leader to sync entry 3")
    counters = h.on_tick(lambda: dict(h.node.counters))
    assert counters.get("journal_fsyncs", 0) == 0
    assert counters["journal_background_fsyncs"] >= 2
    assert counters["journal_background_fsyncs"] == journal_fsyncs(h, fsynced)


def test_of_three_voters_two_followers_commit_while_the_leaders_own_sync_waits(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two followers holding entry 3 on disk are a majority of three without the leader: it
    commits while the leader's own sync still waits for the disk (``fenced_commit``), and the
    leader's journal has not yet synced it."""
    h = make_harness(True, peers=2)
    h.lead()  # its no-op is entry 2
    with slow_sync_thread(monkeypatch) as disk:
        propose_entry_3(h)
        for peer in h.peers:
            h.reply(next_node_idx(4, success=True, reset=False), peer)
        wait_for(lambda: h.on_tick(lambda: h.node.is_leader() and h.node.raftLastApplied >= 3),
                 "entry 3 to commit on the followers' copies, and be applied, by the leader")
        assert h.on_tick(lambda: h.node.internals.raft_log.synced_index) < 3
        disk.set()
    assert h.node.counters["commit_before_flush"] == 0


def test_a_leader_that_steps_down_applies_nothing_its_unsynced_copy_counted_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Of three voters, one follower and the leader's unsynced copy are what PySyncObj's commit
    step counts for entry 3. When the leader stops hearing from its followers it steps down
    (the leader fallback) in the same pass, after that step and before entries are applied:
    the node, no longer leader, must not apply entry 3 either."""
    with harnesses(tmp_path) as make:
        quick_fallback = dataclasses.replace(FAST, leader_fallback_timeout=1.0)
        h = make(fsync=True, peers=2, profile=quick_fallback)
        h.lead()  # its no-op is entry 2
        with slow_sync_thread(monkeypatch) as disk:
            propose_entry_3(h)
            h.reply(next_node_idx(4, success=True, reset=False))
            wait_for(lambda: not h.node.is_leader(), "the leader to step down (no answers)")
            h.on_tick(lambda: None)
            assert h.on_tick(lambda: h.node.internals.raft_log.synced_index) < 3
            assert h.on_tick(lambda: h.node.raftLastApplied) < 3
            disk.set()


def test_a_lone_node_syncs_on_its_tick_thread_and_counts_each_sync(
        tmp_path: Path, fsynced: list[str]) -> None:
    """A cluster of one commits as soon as it ticks, counting its own copy only: it syncs on
    its tick thread, before the commit, and ``journal_fsyncs`` counts each of those syncs."""
    node = RaftNode(StateMachine(cluster_id=1), RaftOptions(
        self_address=f"127.0.0.1:{free_port()}", peers=(), data_dir=str(tmp_path / "alone"),
        password="durable-unit-test", profile=FAST, fsync=True))
    try:
        wait_for(node.is_leader, "the lone node to lead")
        for _ in range(3):
            with pytest.raises(OutcomeUnknown):
                node.propose(b"entry", timeout=0.0)
            last = node.on_tick_thread(lambda: node.internals.raft_log[-1][1], 2.0)
            wait_for(lambda: node.raftCommitIndex >= last, "the entry to commit")
        counters = node.on_tick_thread(lambda: dict(node.counters), 2.0)
        on_disk = fsynced.count(os.path.realpath(tmp_path / "alone" / "raft.journal"))
        assert counters["journal_fsyncs"] >= 3
        assert counters["journal_fsyncs"] + counters.get("journal_background_fsyncs", 0) == on_disk
    finally:
        node.stop()


# -- the commit fence alone (``durable.fenced_commit``): five voters, the leader's term 3 ---------

def term_3_from(index: int) -> Callable[[int], int]:
    return lambda i: 3 if i >= index else 2


def test_what_the_leader_has_synced_commits_as_its_commit_step_found() -> None:
    assert durable.fenced_commit(9, 4, 9, [9, 9, 0, 0], term_3_from(5), 3) == 9


def test_past_what_the_leader_synced_an_entry_needs_a_majority_without_it() -> None:
    # Synced to 6; entries 7 and 8 held by three followers (a majority of five), 9 by two.
    assert durable.fenced_commit(9, 4, 6, [9, 9, 8, 0], term_3_from(5), 3) == 8
    assert durable.fenced_commit(9, 4, 6, [9, 9, 0, 0], term_3_from(5), 3) == 6


def test_only_an_entry_of_the_leaders_term_commits_by_counting() -> None:
    """Thesis 3.6.2: the durable majority holds entry 6 of term 2 only: nothing new commits."""
    assert durable.fenced_commit(9, 4, 6, [9, 9, 0, 0], term_3_from(7), 3) == 4


def test_of_three_voters_both_followers_make_a_majority_without_the_leader() -> None:
    assert durable.fenced_commit(5, 1, 2, [5, 5], term_3_from(2), 3) == 5
    assert durable.fenced_commit(5, 1, 2, [5, 4], term_3_from(2), 3) == 4


def test_of_two_voters_the_follower_alone_is_no_majority() -> None:
    assert durable.fenced_commit(5, 0, 0, [5], term_3_from(1), 3) == 0


def test_the_fence_never_lowers_a_commit_already_reached() -> None:
    assert durable.fenced_commit(9, 7, 6, [9, 9, 0, 0], term_3_from(5), 3) == 7
    assert durable.fenced_commit(5, 7, 2, [0, 0, 0, 0], term_3_from(5), 3) == 5
