"""D6: PySyncObj 0.3.17 deletes a follower's log entries without a conflict; our fence stops it.

The defect (shared/reference/pysyncobj-0.3.17.md, D6): the leader pipelines appends. A success
reply to an *older* append sets the leader's nextIndex for that follower back, so the leader
re-sends entries the follower already holds; the follower then deletes every entry after the
re-send's ``prevLogIdx``, applied ones included (it logs "truncating already-applied log
entries"), although nothing conflicts. Raft (thesis 3.5) deletes a follower's entries only at a
conflict, and moves a leader's nextIndex back only when a follower rejects an append.

How the tests drive it, deterministically: one ``RaftNode`` in this process, and the test plays
its only peer. The peer's address is one nobody listens on and that sorts after the node's own,
so the node never dials it (PySyncObj: only the larger address dials) and nothing arrives from
the network. The test hands each message to the transport's message callback
(``transport._onMessageReceivedCallback``, which ``kvstore.node.d6_fence`` wraps) on the node's
tick thread (``RaftNode.on_tick_thread``), which is where and how PySyncObj handles a message that
arrived on a socket. What the node answers goes nowhere (the transport has no connection).

Plain vs fenced: the plain node is the same ``RaftNode`` built with ``RaftOptions(d6_fence=False)``.
The fence is the only code of ours on the message path, so that node handles messages exactly as
PySyncObj 0.3.17 does. Each test that states Raft's rule runs on both; on the plain node it is
marked ``xfail(strict=True, raises=RaftRuleBroken)``: it must fail there, and only on the rule's
assertions (``with raft_rule(...)``), not in set-up; an upstream fix would turn it into a
failure to look at. Genuine conflicts and rejections must behave the same on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from kvstore.node import OutcomeUnknown
from kvstore.node.raft_node import RaftNode, RaftOptions
from kvstore.node.timers import TimerProfile
from kvstore.state_machine import StateMachine
from tests import support
from tests.support import free_port

T = TypeVar("T")

NO_OP = bytes([_COMMAND_TYPE.NO_OP])
"""A log entry PySyncObj applies as nothing: the tests are about the log, not the state."""
FAST = TimerProfile("unit", tick_period=0.01, append_entries_period=0.05, raft_min_timeout=0.2,
                    raft_max_timeout=0.3, leader_fallback_timeout=5.0, driven=True)
"""The shipped (driven) tick loop with short election timeouts, so becoming leader is quick."""
TICK_TIMEOUT = 2.0
SETUP_DEADLINE = 5.0
LAST = 10
"""The follower's log holds entries 1..LAST."""
TRUNCATION_LOG = "truncating already-applied log entries"

FENCED = pytest.param(True, id="fenced")
PLAIN = pytest.param(False, id="plain")


class RaftRuleBroken(AssertionError):
    """An assertion of Raft's rule failed (see ``raft_rule``)."""


@contextmanager
def raft_rule(rule: str) -> Iterator[None]:
    """Marks the assertions that state ``rule``: the plain variants are expected to fail there
    and nowhere else (PySyncObj's own set-up checks are plain ``assert`` statements too)."""
    try:
        yield
    except AssertionError as exc:
        raise RaftRuleBroken(f"{rule}: {exc}") from exc


PLAIN_HAS_D6 = pytest.param(False, id="plain", marks=pytest.mark.xfail(
    strict=True, raises=RaftRuleBroken,
    reason="D6 is present in plain PySyncObj 0.3.17: it breaks the Raft rule asserted here"))



def wait_for(predicate: Callable[[], T], what: str) -> T:
    """Polls ``predicate`` until it returns something truthy. Raises ``TimeoutError`` (not an
    ``AssertionError``: a set-up failure must not pass for the expected D6 failure)."""
    return support.wait_for(predicate, SETUP_DEADLINE, what, error=TimeoutError, poll=0.01)


class Harness:
    """A node under test and the peer the test plays."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        (self.peer,) = node.otherNodes

    def on_tick(self, task: Callable[[], T]) -> T:
        return self.node.on_tick_thread(task, TICK_TIMEOUT)

    def receive(self, message: dict[str, Any]) -> None:
        """The node handles ``message`` as one that came from the peer (on the tick thread)."""
        self.on_tick(lambda: self.node.internals.transport._onMessageReceivedCallback(
            self.peer, message))

    def log(self) -> list[tuple[int, int]]:
        """(index, term) of every entry of the node's log."""
        return self.on_tick(lambda: [(e[1], e[2]) for e in self.node.internals.raft_log[:]])

    # -- the node as a follower -----------------------------------------------------------

    def follow(self, entries_term: int, commit: int) -> None:
        """Makes the node a follower of the peer holding entries 2..LAST of ``entries_term``
        (entry 1 is PySyncObj's initial no-op of term 0), with ``commit`` of them applied."""
        self.receive(append(entries_term, prev=(1, 0), entries=range(2, LAST + 1), commit=commit))
        expected = [(1, 0)] + [(i, entries_term) for i in range(2, LAST + 1)]
        wait_for(lambda: self.log() == expected and self.node.raftLastApplied == commit,
                 f"the follower to hold 1..{LAST} and apply up to {commit}")

    # -- the node as a leader -------------------------------------------------------------

    def lead(self) -> None:
        """Makes the node leader: the peer "connects" (the transport's connected callback) and
        votes for it in the first election it starts."""
        self.on_tick(lambda: self.node.internals.transport._onNodeConnected(self.peer))

        def vote_if_candidate() -> bool:
            if self.node.getStatus()["state"] == _RAFT_STATE.CANDIDATE:
                self.node.internals.transport._onMessageReceivedCallback(
                    self.peer, {"type": "response_vote", "term": self.node.raftCurrentTerm})
            return self.node.is_leader()

        wait_for(lambda: self.on_tick(vote_if_candidate), "the node to win an election")

    def leader_indexes(self) -> tuple[int, int]:
        """The leader's (nextIndex, matchIndex) for the peer."""
        internals = self.node.internals
        return self.on_tick(lambda: (internals.next_index[self.peer],
                                     internals.match_index[self.peer]))

    def reply(self, message: dict[str, Any]) -> tuple[int, int]:
        """Delivers the peer's ``message`` to the node, which must still lead; returns the
        (nextIndex, matchIndex) right after it, before the node's next append re-sends."""
        internals = self.node.internals

        def deliver_and_read() -> tuple[int, int]:
            if not self.node.is_leader():
                raise RuntimeError("the node lost its leadership during the test")
            internals.transport._onMessageReceivedCallback(self.peer, message)
            return internals.next_index[self.peer], internals.match_index[self.peer]

        return self.on_tick(deliver_and_read)


def append(term: int, prev: tuple[int, int], entries: range, commit: int) -> dict[str, Any]:
    """An append_entries message as a leader of ``term`` sends it: after entry ``prev`` (index,
    term), the entries at the indexes ``entries``, all of ``term``."""
    return {"type": "append_entries", "term": term, "commit_index": commit,
            "prevLogIdx": prev[0], "prevLogTerm": prev[1],
            "entries": [(NO_OP, index, term) for index in entries]}


def next_node_idx(next_index: int, *, success: bool, reset: bool) -> dict[str, Any]:
    """A follower's answer to an append, as PySyncObj sends it."""
    return {"type": "next_node_idx", "next_node_idx": next_index, "success": success, "reset": reset}


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[[bool], Harness]]:
    nodes: list[RaftNode] = []

    def make(fenced: bool) -> Harness:
        port = free_port()
        node = RaftNode(StateMachine(cluster_id=1), RaftOptions(
            self_address=f"127.0.0.1:{port}",
            # Sorts after the node's address, so the node never dials it; nobody listens there.
            peers=(f"127.0.0.2:{port}",),
            data_dir=str(tmp_path / f"node{len(nodes)}"),
            password="d6-unit-test",
            profile=FAST,
            d6_fence=fenced,
            # Plain means plain: no code of ours on the message path (our membership filter
            # wraps it too), so the plain node is PySyncObj 0.3.17's.
            membership_fence=fenced,
        ))
        nodes.append(node)
        return Harness(node)

    yield make
    for node in nodes:
        node.stop()


def truncations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if TRUNCATION_LOG in r.getMessage()]


# -- follower side ------------------------------------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_stale_copy_of_held_entries_deletes_nothing(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """D6, follower side. Raft (thesis 3.5): a follower deletes entries only when one conflicts
    with the leader's (same index, different term). A re-sent copy of entries 4..5 after
    prevLogIdx 3, all matching what the follower holds, must leave its log 1..10 alone;
    plain PySyncObj cuts it back to 1..5, deleting applied entries."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)
    held = h.log()

    h.receive(append(1, prev=(3, 1), entries=range(4, 6), commit=LAST))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == held
        assert not truncations(caplog)


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_stale_copy_with_new_entries_appends_them_and_deletes_nothing(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """D6, follower side. Raft (thesis 3.5): only a conflict deletes entries. An append from
    prevLogIdx 3 carrying 4..12, where 4..10 match what the follower holds, must only add 11
    and 12; plain PySyncObj deletes 4..10 (applied) and writes them again."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)

    h.receive(append(1, prev=(3, 1), entries=range(4, LAST + 3), commit=LAST))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, LAST + 3)]
        assert not truncations(caplog), "applied entries were deleted (and written again)"


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_genuine_conflict_still_truncates(make_harness: Callable[[bool], Harness],
                                            fenced: bool) -> None:
    """The fence must not hide real conflicts (D6 is about non-conflicting appends). Raft
    (thesis 3.5): a follower holding uncommitted entries 6..10 of term 1 that a new leader of
    term 2 replaces from index 6 deletes 6..10 and takes the leader's 6..7."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=5)

    h.receive(append(2, prev=(5, 1), entries=range(6, 8), commit=5))

    log_after = h.log()
    with raft_rule("thesis 3.5: a conflicting entry and all that follow it are deleted"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, 6)] + [(6, 2), (7, 2)]


# -- leader side --------------------------------------------------------------------------------


def lead_with_pipelined_appends(h: Harness) -> int:
    """Makes the node leader with entries 3..7 appended after its no-op at index 2 and sent to
    the peer (nextIndex 8) but not yet acknowledged (matchIndex 0). Returns the last index, 7."""
    h.lead()
    last = 7
    for index in range(3, last + 1):
        # Queued on the leader; with its only peer silent nothing commits, so no outcome comes.
        # One at a time: proposals waiting together would go out as one batch (one entry).
        with pytest.raises(OutcomeUnknown):
            h.node.propose(b"entry", timeout=0.0)
        wait_for(lambda i=index: h.log()[-1][0] == i, f"the leader to append entry {index}")
    wait_for(lambda: h.leader_indexes() == (last + 1, 0), "the leader to send up to its last entry")
    return last


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_success_reply_to_an_older_append_does_not_move_next_index_back(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """D6, leader side. Raft (thesis 3.5, Figure 3.1): the leader moves nextIndex back only when
    the follower rejects an append; a success says the follower holds entries up to that
    append's last one, which does not undo later appends already sent. The answer to the
    leader's first append (its no-op at 2: next 3) arrives after it sent 3..7: plain PySyncObj
    sets nextIndex back to 3 and re-sends 3..7, the stale copy of the tests above."""
    h = make_harness(fenced)
    last = lead_with_pipelined_appends(h)

    next_index, match_index = h.reply(next_node_idx(3, success=True, reset=False))

    with raft_rule("Figure 3.1: nextIndex moves back only when a follower rejects an append"):
        assert match_index == 2
        assert next_index == last + 1, "a success reply moved nextIndex back"


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_rejection_still_moves_next_index_back(make_harness: Callable[[bool], Harness],
                                                 fenced: bool) -> None:
    """The fence holds back success replies only. Raft (Figure 3.1): when a follower rejects an
    append because its log does not match, the leader moves nextIndex back and retries."""
    h = make_harness(fenced)
    lead_with_pipelined_appends(h)

    next_index, match_index = h.reply(next_node_idx(3, success=False, reset=True))

    with raft_rule("Figure 3.1: after a rejection, the leader moves nextIndex back and retries"):
        assert (next_index, match_index) == (3, 0)


def test_the_plain_node_handles_messages_with_pysyncobj_alone(
        make_harness: Callable[[bool], Harness]) -> None:
    """What makes the plain variant plain: without the fence, the transport hands messages
    straight to PySyncObj's own handler; with it, to the fence."""
    plain, fenced = make_harness(False).node, make_harness(True).node
    assert plain.internals.transport._onMessageReceivedCallback == plain._SyncObj__onMessageReceived
    assert fenced.internals.transport._onMessageReceivedCallback != fenced._SyncObj__onMessageReceived
