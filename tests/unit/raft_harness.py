"""One real ``RaftNode`` in this process, driven message by message; the test plays its peer.

The peer's address is one nobody listens on and that sorts after the node's own, so the node
never dials it (PySyncObj: only the larger address dials) and nothing arrives from the network.
The test hands each message to the transport's message callback
(``transport._onMessageReceivedCallback``, which ``kvstore.node.d6_fence`` wraps) on the node's
tick thread (``RaftNode.on_tick_thread``), which is where and how PySyncObj handles a message that
arrived on a socket. What the node sends the peer is recorded at the transport (``WireSpy``, in
place of the TCP connection it would use): a follower's reply says what it vouches for, which is
what the leader counts, and the moment a message leaves is when what it claims must be true.

Used by ``test_d6_fence.py`` (the D6 fence) and ``test_durable.py`` (the durable mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE
from pysyncobj.tcp_connection import CONNECTION_STATE

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


def wait_for(predicate: Callable[[], T], what: str) -> T:
    """Polls ``predicate`` until it returns something truthy. Raises ``TimeoutError`` (not an
    ``AssertionError``: a set-up failure must not pass for the expected D6 failure)."""
    return support.wait_for(predicate, SETUP_DEADLINE, what, error=TimeoutError, poll=0.01)


class WireSpy:
    """Stands in for the transport's connection to the peer: records every message the node
    sends it (on the tick thread), and sends nothing."""

    state = CONNECTION_STATE.CONNECTED

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.probe: Callable[[Any], Any] | None = None
        """If set, called with each message the moment it leaves; its answers are ``probed``."""
        self.probed: list[tuple[Any, Any]] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)
        if self.probe is not None:
            self.probed.append((message, self.probe(message)))

    def disconnect(self) -> None:
        pass


class Harness:
    """A node under test and the peer the test plays."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self.peers = sorted(node.otherNodes, key=lambda n: n.address)
        """The peers the test plays; ``peer`` (and its ``wire``) is the first."""
        self.peer = self.peers[0]
        self.wires = [WireSpy() for _ in self.peers]
        self.wire = self.wires[0]
        self.on_tick(lambda: node.internals.transport._connections.update(
            zip(self.peers, self.wires)))

    def on_tick(self, task: Callable[[], T]) -> T:
        return self.node.on_tick_thread(task, TICK_TIMEOUT)

    def receive(self, message: dict[str, Any]) -> None:
        """The node handles ``message`` as one that came from the peer (on the tick thread)."""
        self.on_tick(lambda: self.node.internals.transport._onMessageReceivedCallback(
            self.peer, message))

    def replies(self) -> list[dict[str, Any]]:
        """The follower's answers to appends (``next_node_idx``) sent so far, oldest first."""
        return self.on_tick(lambda: [m for m in self.wire.sent
                                     if type(m) is dict and m.get("type") == "next_node_idx"])

    def last_reply(self) -> dict[str, Any]:
        """The follower's answer to the last message it was handed (which must have one)."""
        replies = self.replies()
        if not replies:
            raise RuntimeError("the node sent no next_node_idx")
        return replies[-1]

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

    def follow_in_two_terms(self, commit: int) -> None:
        """Like ``follow(1, commit)``, then a leader of term 2 replaces entry LAST: the
        follower holds 2..LAST-1 of term 1 and LAST of term 2 (``commit`` < LAST)."""
        self.follow(entries_term=1, commit=commit)
        self.receive(append(2, prev=(LAST - 1, 1), entries=[LAST], commit=commit))
        expected = [(1, 0)] + [(i, 1) for i in range(2, LAST)] + [(LAST, 2)]
        wait_for(lambda: self.log() == expected, f"the follower to hold 2..{LAST - 1} of term 1 "
                 f"and {LAST} of term 2")

    def fence_counts(self) -> dict[str, int]:
        """What the D6 fence says it did (``RaftNode.counters``, the ``d6_`` ones)."""
        return self.on_tick(lambda: {k: v for k, v in self.node.counters.items()
                                     if k.startswith("d6_") and v})

    # -- the node as a leader -------------------------------------------------------------

    def lead(self) -> None:
        """Makes the node leader: the peer "connects" (the transport's connected callback) and
        votes for it in the first election it starts."""
        for peer in self.peers:
            self.on_tick(lambda p=peer: self.node.internals.transport._onNodeConnected(p))

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

    def reply(self, message: dict[str, Any], peer: Any = None) -> tuple[int, int]:
        """Delivers ``message`` from ``peer`` (the first by default) to the node, which must
        still lead; returns that peer's (nextIndex, matchIndex) right after it, before the
        node's next append re-sends."""
        internals = self.node.internals
        sender = self.peer if peer is None else peer

        def deliver_and_read() -> tuple[int, int]:
            if not self.node.is_leader():
                raise RuntimeError("the node lost its leadership during the test")
            internals.transport._onMessageReceivedCallback(sender, message)
            return internals.next_index[sender], internals.match_index[sender]

        return self.on_tick(deliver_and_read)


def append(term: int, prev: tuple[int, int], entries: Iterable[int] | Iterable[tuple[int, int]],
           commit: int, *, entries_term: int | None = None) -> dict[str, Any]:
    """An append_entries message as a leader of ``term`` sends it: after entry ``prev`` (index,
    term), the entries at the indexes ``entries``, all of ``entries_term`` (default: ``term``;
    a leader re-sends older entries with the terms they were made in), or given as (index,
    term) pairs."""
    made_in = term if entries_term is None else entries_term
    made = [e if isinstance(e, tuple) else (e, made_in) for e in entries]
    return {"type": "append_entries", "term": term, "commit_index": commit,
            "prevLogIdx": prev[0], "prevLogTerm": prev[1],
            "entries": [(NO_OP, index, t) for index, t in made]}


def transmission(term: int, prev: tuple[int, int], entry: tuple[int, int], commit: int
                 ) -> list[dict[str, Any]]:
    """How PySyncObj's leader sends one entry too large for an append: the pickled entry in
    chunks, each an append_entries with ``transmission`` start, process..., finish."""
    data = pysyncobj_pickle.dumps((NO_OP, *entry))
    chunks = [data[:len(data) // 2], data[len(data) // 2:]]
    return [{"type": "append_entries", "term": term, "commit_index": commit,
             "prevLogIdx": prev[0], "prevLogTerm": prev[1], "transmission": stage, "data": chunk}
            for stage, chunk in zip(("start", "finish"), chunks, strict=True)]


def next_node_idx(next_index: int, *, success: bool, reset: bool) -> dict[str, Any]:
    """A follower's answer to an append, as PySyncObj sends it."""
    return {"type": "next_node_idx", "next_node_idx": next_index, "success": success, "reset": reset}


@contextmanager
def harnesses(directory: Path) -> Iterator[Callable[..., Harness]]:
    """Makes harnessed nodes (``make(fenced=..., fsync=..., peers=..., ...)``, the keywords
    below) with data under ``directory``; stops them all when the block ends."""
    nodes: list[RaftNode] = []

    def make(*, fenced: bool = True, fsync: bool = False, peers: int = 1,
             profile: TimerProfile = FAST, quick_syncs_inline: bool = True,
             one_round_in_flight: bool = False) -> Harness:
        port = free_port()
        node = RaftNode(StateMachine(cluster_id=1), RaftOptions(
            self_address=f"127.0.0.1:{port}",
            # Sorts after the node's address, so the node never dials it; nobody listens there.
            peers=tuple(f"127.0.0.{2 + i}:{port}" for i in range(peers)),
            data_dir=str(directory / f"node{len(nodes)}"),
            password="raft-unit-test",
            profile=profile,
            d6_fence=fenced,
            # Plain means plain: no code of ours on the message path (our membership filter
            # wraps it too), so the plain node is PySyncObj 0.3.17's.
            membership_fence=fenced,
            fsync=fsync,
            quick_syncs_inline=quick_syncs_inline,
            # The tests play the peers and often append before they acknowledge: off unless a
            # test is about that rule (kvstore.node.append_rounds).
            one_round_in_flight=one_round_in_flight,
        ))
        nodes.append(node)
        return Harness(node)

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()
