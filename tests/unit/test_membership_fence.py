"""PySyncObj 0.3.17's dynamic membership against Raft's rules (thesis chapter 4); our fence.

Driven message by message, as ``test_d6_fence.py`` does: one ``RaftNode`` in this process, and
the test plays its peers, whose addresses sort after the node's own (so the node never dials
them) and where nobody listens. Messages are handed to the transport's callback on the node's
tick thread; what the node sends is recorded (``Harness.sent``) and goes nowhere.

Plain vs fenced: the plain node is ``RaftOptions(membership_fence=False, d6_fence=False)``:
PySyncObj's own ``dynamicMembershipChange``, nothing of ours on the message path, and its
changes requested with its own API (``addNodeToCluster``, ``removeNodeFromCluster``). The fenced
node is the shipped one (``kvstore.node.membership``). A test that states a rule PySyncObj
breaks runs on both and is ``xfail(strict=True, raises=RaftRuleBroken)`` on the plain node: it
must fail there, on the rule's assertions only. Rules PySyncObj keeps run on both, unmarked.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pysyncobj import FAIL_REASON
from pysyncobj.node import TCPNode
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from kvstore.node import dump_file
from kvstore.node.member_table import (
    ChangeRefused,
    MemberInfo,
    Role,
    Table,
    entry_bytes,
    is_membership_entry,
)
from kvstore.node.outcomes import NotApplied
from kvstore.node.raft_node import RaftNode, RaftOptions
from kvstore.state_machine import StateMachine
from tests.support import free_port
from tests.unit.raft_harness import FAST, NO_OP, next_node_idx, wait_for
from tests.unit.test_d6_fence import RaftRuleBroken, raft_rule

T = TypeVar("T")
TICK_TIMEOUT = 2.0
HELD_FOR_PASSES = 5
"""Passes in which a leader appends a proposal it was given, or commits what a majority
acknowledged (it does either in the next pass): a rule that neither happens waits this many."""
PLAIN_MEMBERSHIP = 2
"""PySyncObj's own membership entry type (``_COMMAND_TYPE.MEMBERSHIP``)."""

FENCED = pytest.param(True, id="fenced")
PLAIN = pytest.param(False, id="plain")


def plain_breaks(defect: str) -> Any:
    return pytest.param(False, id="plain", marks=pytest.mark.xfail(
        strict=True, raises=RaftRuleBroken,
        reason=f"{defect} is present in plain PySyncObj 0.3.17: it breaks the rule asserted here"))


class Harness:
    """A node under test, the peers the test plays, and what the node sent them."""

    def __init__(self, node: RaftNode, fenced: bool) -> None:
        self.node, self.fenced = node, fenced
        self.peers = sorted(node.otherNodes, key=lambda n: n.address)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        transport = node.internals.transport
        original = transport.send

        def recording(peer: Any, message: Any) -> Any:
            if isinstance(message, dict):
                self.sent.append((peer.address, message))
            return original(peer, message)

        transport.send = recording

    @property
    def address(self) -> str:
        return self.node.selfNode.address

    def on_tick(self, task: Callable[[], T]) -> T:
        return self.node.on_tick_thread(task, TICK_TIMEOUT)

    def receive(self, message: dict[str, Any], peer: Any = None) -> None:
        sender = peer if peer is not None else self.peers[0]
        self.on_tick(lambda: self.node.internals.transport._onMessageReceivedCallback(
            sender, message))

    def passes(self, count: int) -> None:
        """Waits until the tick thread has made ``count`` more whole passes: what a rule that
        nothing happens waits for, instead of a time that may hold no pass on a busy machine."""
        start = self.on_tick(lambda: self.node.counters["ticks"])
        wait_for(lambda: self.node.counters["ticks"] >= start + count + 1,
                 f"{count} passes of the tick thread")

    def log(self) -> list[tuple[bytes, int, int]]:
        return self.on_tick(lambda: list(self.node.internals.raft_log[:]))

    def voters(self) -> set[str]:
        return self.on_tick(lambda: {n.address for n in self.node.otherNodes})

    # -- the node as a follower -----------------------------------------------------------------

    def follow(self, commands: list[bytes], commit: int, term: int = 1) -> None:
        """The node follows peers[0], holding ``commands`` at indexes 2.. (entry 1 is
        PySyncObj's initial no-op), with entries up to ``commit`` applied."""
        entries = [(c, i, term) for i, c in enumerate(commands, start=2)]
        self.receive({"type": "append_entries", "term": term, "commit_index": commit,
                      "prevLogIdx": 1, "prevLogTerm": 0, "entries": entries})
        last = len(commands) + 1
        wait_for(lambda: self.log()[-1][1] == last and self.node.raftLastApplied == commit,
                 f"the follower to hold 1..{last} and apply up to {commit}")

    # -- the node as a leader --------------------------------------------------------------------

    def lead(self) -> None:
        """Every peer connects; the first votes for the node in its first election; every peer
        then acknowledges the new leader's no-op, which commits."""
        for peer in self.peers:
            self.on_tick(lambda p=peer: self.node.internals.transport._onNodeConnected(p))

        def vote_if_candidate() -> bool:
            if self.node.getStatus()["state"] == _RAFT_STATE.CANDIDATE:
                for peer in self.peers:
                    self.node.internals.transport._onMessageReceivedCallback(
                        peer, {"type": "response_vote", "term": self.node.raftCurrentTerm})
            return self.node.is_leader()

        wait_for(lambda: self.on_tick(vote_if_candidate), "the node to win an election")
        self.ack_all()
        noop = self.log()[-1][1]
        wait_for(lambda: self.node.raftLastApplied >= noop, "the leader's no-op to commit")

    def ack_all(self, peers: list[Any] | None = None) -> None:
        """``peers`` (default: all) acknowledge everything in the leader's log."""
        last = self.log()[-1][1]
        for peer in peers if peers is not None else self.peers:
            self.on_tick(lambda p=peer: self.node.internals.transport._onMessageReceivedCallback(
                p, next_node_idx(last + 1, success=True, reset=False)))

    def request(self, kind: str, address: str) -> bool:
        """Asks the leader for a membership change; whether it took the request (rather than
        refusing it at once). The fenced node adds learners; the plain one can only add voters."""
        if self.fenced:
            membership = self.node.membership
            assert membership is not None
            call = {"add": lambda: membership.add_learner(f"x{address[-5:]}", address,
                                                          f"{address}1"),
                    "remove": lambda: membership.remove(address)}[kind]
            try:
                self.on_tick(call)
            except (NotApplied, ChangeRefused):
                return False
            return True
        outcome: list[int] = []
        method = {"add": self.node.addNodeToCluster, "remove": self.node.removeNodeFromCluster}
        self.on_tick(lambda: method[kind](address, callback=lambda _r, e: outcome.append(e)))
        wait_for(lambda: self.on_tick(lambda: not self.node.internals.queue),
                 "the leader to take the request from its queue")
        return not outcome or outcome[0] == FAIL_REASON.SUCCESS

    # -- entries of either flavour ------------------------------------------------------------------

    def table(self, members: dict[str, Role]) -> Table:
        return Table.of([MemberInfo("", a, "", r) for a, r in members.items()], "test change")

    def add_voter_entry(self, address: str) -> bytes:
        """A membership entry that adds ``address`` as a voter to the node and its peers."""
        if self.fenced:
            voters = {self.address, *(p.address for p in self.peers), address}
            return entry_bytes(self.table(dict.fromkeys(voters, Role.VOTER)))
        return bytes([PLAIN_MEMBERSHIP]) + pickle.dumps(["add", address, TCPNode(address)])

    def remove_entry(self, address: str) -> bytes:
        if self.fenced:
            members = dict.fromkeys({self.address, *(p.address for p in self.peers)}, Role.VOTER)
            members[address] = Role.REMOVED
            return entry_bytes(self.table(members))
        return bytes([PLAIN_MEMBERSHIP]) + pickle.dumps(["rem", address, TCPNode(address)])


def is_change(command: bytes) -> bool:
    return is_membership_entry(command) or command[:1] == bytes([PLAIN_MEMBERSHIP])


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    nodes: list[RaftNode] = []

    def make(fenced: bool, peers: int = 1, *, data_dir: Path | None = None,
             port: int | None = None) -> Harness:
        port = port or free_port()
        node = RaftNode(StateMachine(cluster_id=1), RaftOptions(
            self_address=f"127.0.0.1:{port}",
            # Sort after the node's address, so it never dials them; nobody listens there.
            peers=tuple(f"127.0.0.{2 + i}:{port}" for i in range(peers)),
            data_dir=str(data_dir or tmp_path / f"node{len(nodes)}"),
            password="membership-unit-test",
            profile=FAST,
            d6_fence=fenced,
            membership_fence=fenced,
        ))
        nodes.append(node)
        return Harness(node, fenced)

    yield make
    for node in nodes:
        node.stop()


def restart(make: Callable[..., Harness], h: Harness) -> Harness:
    """Stops the node and starts it again on the same address and data directory."""
    data_dir, port = Path(h.node._n_options.data_dir), int(h.address.rsplit(":", 1)[1])
    h.node.stop()
    again = make(h.fenced, len(h.peers), data_dir=data_dir, port=port)
    wait_for(lambda: again.node.counters["ticks"] > 2, "the restarted node to tick")
    return again


# -- M1: one change at a time ---------------------------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, plain_breaks("M1")])
def test_m1_a_second_change_waits_until_the_first_is_committed(
        make_harness: Callable[..., Harness], fenced: bool) -> None:
    """Thesis 4.1: a leader does not begin a new configuration change until the previous one
    is committed. The first change here cannot commit (its peer stays silent). Plain PySyncObj
    appends the second anyway: its guard (``__changeClusterIDx``) is never set."""
    h = make_harness(fenced)
    h.lead()
    assert h.request("add", "127.0.0.9:1001"), "the first change was refused"
    h.request("add", "127.0.0.9:1002")

    commit = h.node.raftCommitIndex
    uncommitted = [e for e in h.log() if is_change(e[0]) and e[1] > commit]
    with raft_rule("thesis 4.1: one configuration change at a time"):
        assert len(uncommitted) == 1, f"{len(uncommitted)} uncommitted changes in the log"


def test_a_change_must_wait_for_an_entry_of_the_leaders_term(
        make_harness: Callable[..., Harness]) -> None:
    """Thesis 4.1 (the 2015 correction): a leader appends a change only once it has committed
    an entry of its own term. Before its no-op commits, the change is refused (retry later)."""
    h = make_harness(True)
    for peer in h.peers:
        h.on_tick(lambda p=peer: h.node.internals.transport._onNodeConnected(p))

    def vote() -> bool:
        if h.node.getStatus()["state"] == _RAFT_STATE.CANDIDATE:
            h.node.internals.transport._onMessageReceivedCallback(
                h.peers[0], {"type": "response_vote", "term": h.node.raftCurrentTerm})
        return h.node.is_leader()

    wait_for(lambda: h.on_tick(vote), "the node to win an election")
    assert not h.request("add", "127.0.0.9:1001")
    h.ack_all()
    wait_for(lambda: h.request("add", "127.0.0.9:1001"), "the change to be accepted")


# -- M2: the log is the source of truth on a restart ------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, plain_breaks("M2")])
def test_m2_a_restarted_node_uses_the_latest_configuration_in_its_log(
        make_harness: Callable[..., Harness], fenced: bool) -> None:
    """Thesis 4.1: a server uses the latest configuration in its log, whether or not it is
    committed. The follower holds a change adding a voter beyond its commit index; restarted
    with the peers it was created with, it must still count that voter. Plain PySyncObj uses
    the constructor's peers and re-applies the change only once it commits."""
    h = make_harness(fenced)
    added = "127.0.0.9:1001"
    h.follow([NO_OP, NO_OP, h.add_voter_entry(added)], commit=3)
    assert added in h.voters(), "the change did not take effect on append"

    again = restart(make_harness, h)

    voters = again.voters()
    with raft_rule("thesis 4.1: the latest configuration in the log, committed or not"):
        assert added in voters, f"after a restart the voters are {sorted(voters)}"


def test_a_truncated_change_is_undone(make_harness: Callable[..., Harness]) -> None:
    """Thesis 4.1: a change whose entry is deleted (a new leader's log wins) is undone: the
    node falls back to the configuration before it."""
    h = make_harness(True)
    added = "127.0.0.9:1001"
    h.follow([NO_OP, NO_OP, h.add_voter_entry(added)], commit=3)
    assert added in h.voters()
    # A leader of term 2 replaces entry 4 (the change) with its own.
    h.receive({"type": "append_entries", "term": 2, "commit_index": 3, "prevLogIdx": 3,
               "prevLogTerm": 1, "entries": [(NO_OP, 4, 2)]})
    wait_for(lambda: h.log()[-1][1:] == (4, 2), "the conflicting entry to be replaced")
    assert added not in h.voters()


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_membership_survives_a_restart_after_compaction(
        make_harness: Callable[..., Harness], fenced: bool) -> None:
    """A committed change compacted into the snapshot: after a restart (snapshot + journal)
    the node still counts the voter it added."""
    h = make_harness(fenced)
    added = "127.0.0.9:1001"
    h.follow([NO_OP, h.add_voter_entry(added), NO_OP, NO_OP], commit=5)
    h.node.forceLogCompaction()
    wait_for(lambda: h.node.counters["snapshots_written"] >= 1, "a snapshot")
    wait_for(lambda: h.log()[0][1] > 3, "the log to be compacted past the change")
    # More entries and a second snapshot, written from what the node kept after the first.
    h.receive({"type": "append_entries", "term": 1, "commit_index": 8, "prevLogIdx": 5,
               "prevLogTerm": 1, "entries": [(NO_OP, i, 1) for i in (6, 7, 8)]})
    wait_for(lambda: h.node.raftLastApplied == 8, "entries 6..8 to apply")
    h.node.forceLogCompaction()
    wait_for(lambda: h.node.counters["snapshots_written"] >= 2, "a second snapshot")

    again = restart(make_harness, h)

    assert added in again.voters()
    # The state is restored on a background thread and swapped in at a later tick.
    wait_for(lambda: again.node.counters["snapshots_loaded"] >= 1, "the snapshot to be loaded")
    assert again.node.counters["snapshots_loaded"] == 1


# -- M3: the table stored with a snapshot --------------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, plain_breaks("M3")])
def test_m3_a_snapshot_records_the_configuration_at_its_index(
        make_harness: Callable[..., Harness], fenced: bool, tmp_path: Path) -> None:
    """A snapshot replaces the log up to its index, so the configuration it records must be
    the one in effect at that index (thesis 5.1: the snapshot holds "the latest configuration
    as of the last included index"). Here a change is appended after the snapshot's index and
    not committed (a new leader may still delete it); plain PySyncObj hands the serializer its
    current configuration, which includes it."""
    h = make_harness(fenced)
    added = "127.0.0.9:1001"
    h.follow([NO_OP, NO_OP, NO_OP, h.add_voter_entry(added)], commit=4)
    h.node.forceLogCompaction()
    wait_for(lambda: h.node.counters["snapshots_written"] >= 1, "a snapshot")

    meta = dump_file.read(str(Path(h.node._n_options.data_dir) / "raft.dump")).meta
    with raft_rule("thesis 5.1: a snapshot's configuration is the one at its last index"):
        assert added not in meta["cluster"], f"the snapshot at index {meta['last'][1]} " \
            f"records {meta['cluster']}"


# -- M4: removing the leader ----------------------------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, plain_breaks("M4")])
def test_m4_the_leader_can_be_removed_and_hands_over_first(
        make_harness: Callable[..., Harness], fenced: bool) -> None:
    """Thesis 4.2.2: the leader may be removed from the cluster. Asked to remove itself, ours
    first hands its leadership to an up-to-date voter (timeout_now), and the new leader removes
    it; plain PySyncObj refuses the request (REQUEST_DENIED)."""
    h = make_harness(fenced, peers=2)
    h.lead()
    accepted = h.request("remove", h.address)
    h.ack_all()

    def handed_over() -> bool:
        return any(m.get("type") == "timeout_now" for _, m in h.sent)

    with raft_rule("thesis 4.2.2: the leader can be removed"):
        assert accepted, "the leader refused to be removed"
        assert wait_for_bool(handed_over, 2.0), "the leader did not hand over its leadership"


def wait_for_bool(predicate: Callable[[], bool], timeout: float) -> bool:
    """``predicate`` became true within ``timeout`` (polled), without raising."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_leader_handing_over_holds_new_proposals(make_harness: Callable[..., Harness]) -> None:
    """While it hands over, the leader appends nothing new: otherwise the target would never
    hold its whole log, and transferLeadership refuses a target that is behind."""
    h = make_harness(True, peers=2)
    h.lead()
    assert h.request("remove", h.address)
    last = h.log()[-1][1]
    h.node.submit(b"held", lambda _r, _e: None)
    h.passes(HELD_FOR_PASSES)  # enough for a leader to append a proposal: none may be appended
    assert h.log()[-1][1] == last


# -- M5: a removed member learns of it --------------------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, plain_breaks("M5")])
def test_m5_the_leader_still_sends_the_removal_to_the_removed_member(
        make_harness: Callable[..., Harness], fenced: bool) -> None:
    """A removed server must learn that it was removed, or it goes on serving and campaigning
    (thesis 4.2.3 is about the disruption that causes). Ours keeps sending the removed member
    the log until the next change; plain PySyncObj drops it from its transport the moment it
    appends the removal, so the removed member never receives the entry that removes it."""
    h = make_harness(fenced, peers=2)
    h.lead()
    removed = h.peers[1].address
    assert h.request("remove", removed)
    wait_for(lambda: is_change(h.log()[-1][0]), "the removal to be appended")
    h.sent.clear()
    h.on_tick(h.node.internals.force_append)

    def sent_to_removed() -> bool:
        return any(a == removed and m.get("type") == "append_entries" for a, m in h.sent)

    sent = wait_for_bool(sent_to_removed, 1.0)
    with raft_rule("the removed member receives the entry that removes it"):
        assert sent, "the leader sent nothing more to the member it removed"


@pytest.mark.parametrize("fenced", [FENCED, plain_breaks("M5")])
def test_m5_a_removed_member_never_campaigns(make_harness: Callable[..., Harness],
                                             fenced: bool) -> None:
    """A server not in its latest configuration does not start elections (thesis 4.2.3: a
    removed server that times out and campaigns disrupts the cluster). The follower appends
    the entry that removes it, its leader falls silent: plain PySyncObj campaigns within an
    election timeout; ours stays a follower and reports itself removed."""
    h = make_harness(fenced)
    h.on_tick(lambda: h.node.internals.transport._onNodeConnected(h.peers[0]))
    h.follow([NO_OP, h.remove_entry(h.address)], commit=2)
    term = h.node.raftCurrentTerm

    campaigned = wait_for_bool(lambda: h.node.raftCurrentTerm > term, 3 * FAST.raft_max_timeout)
    with raft_rule("thesis 4.2.3: a removed server does not campaign"):
        assert not campaigned, "the removed member started an election"
    assert h.node.membership is not None and h.node.membership.removed


def test_vote_requests_of_a_removed_member_are_ignored(make_harness: Callable[..., Harness]) -> None:
    """Thesis 4.2.3: a removed server's RequestVote with a higher term must not depose anyone.
    A follower that has appended the removal ignores it (term unchanged, no vote)."""
    h = make_harness(True, peers=2)
    removed = h.peers[1]
    h.follow([NO_OP, h.remove_entry(removed.address)], commit=2)
    term = h.node.raftCurrentTerm
    h.receive({"type": "request_vote", "term": term + 5, "last_log_index": 99,
               "last_log_term": term + 4}, peer=removed)
    assert h.node.raftCurrentTerm == term
    assert not any(m.get("type") == "response_vote" for _, m in h.sent)


# -- learners ------------------------------------------------------------------------------------


def test_a_learner_receives_the_log_and_counts_for_nothing(
        make_harness: Callable[..., Harness]) -> None:
    """etcd's learner: a learner is sent the log and its match index is tracked, but its
    acknowledgements commit nothing. With the one voter peer silent, the leader's entries stay
    uncommitted however far the learner gets; once the voter acknowledges, they commit."""
    h = make_harness(True)
    h.lead()
    learner = "127.0.0.9:1001"
    assert h.request("add", learner)
    node = h.on_tick(h.node.internals.transport_nodes)[learner]
    h.on_tick(lambda: h.node.internals.transport._onNodeConnected(node))
    commit = h.node.raftCommitIndex
    h.ack_all([node])
    last = h.log()[-1][1]
    assert h.on_tick(lambda: h.node.internals.match_index[node]) == last
    h.passes(HELD_FOR_PASSES)  # the learner's acknowledgement must not commit anything
    assert h.node.raftCommitIndex == commit
    h.ack_all([h.peers[0]])
    wait_for(lambda: h.node.raftCommitIndex == last, "the voter's acknowledgement to commit")


def test_a_learner_never_campaigns(make_harness: Callable[..., Harness]) -> None:
    """Only voters start elections: a node whose table makes it a learner stays a follower
    when its leader falls silent, and ignores a timeout_now."""
    h = make_harness(True)
    h.on_tick(lambda: h.node.internals.transport._onNodeConnected(h.peers[0]))
    me, peer = h.address, h.peers[0].address
    h.follow([NO_OP, entry_bytes(h.table({me: Role.LEARNER, peer: Role.VOTER}))], commit=2)
    term = h.node.raftCurrentTerm

    def deliver_timeout_now() -> float:
        # A message that arrives in poll() is followed by PySyncObj's election check, before
        # any tick hook of ours: the deadline must be out of reach as the handler returns.
        h.node.internals.transport._onMessageReceivedCallback(
            h.peers[0], {"type": "timeout_now", "term": term})
        return h.node.internals.election_deadline()

    assert h.on_tick(deliver_timeout_now) == float("inf")
    assert not wait_for_bool(lambda: h.node.raftCurrentTerm > term, 3 * FAST.raft_max_timeout)
    assert h.node.membership is not None and h.node.membership.self_role == "learner"


class SlowRestore(StateMachine):
    """Restores a snapshot slowly, as a large one does (seconds at 1M keys)."""

    def restore(self, data: bytes) -> None:
        time.sleep(3 * FAST.raft_max_timeout)
        super().restore(data)


def test_a_learner_installing_a_slow_snapshot_does_not_campaign_after_it(
        tmp_path: Path) -> None:
    """Only voters campaign, also right after a message that took longer than an election
    timeout to handle. A learner installing a large snapshot from its leader: PySyncObj resets
    the election deadline when the install message arrives, then spends seconds loading it,
    so on the next tick the deadline has passed. The learner must not campaign then (its vote
    request, at a higher term, would depose the leader)."""
    port = free_port()
    me, leader = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
    table = Table.of([MemberInfo("n1", leader, "", Role.VOTER),
                      MemberInfo("n2", me, "", Role.LEARNER)], "add learner n2")
    snapshot = StateMachine(cluster_id=1)
    dump = tmp_path / "made.dump"
    last, prev = (NO_OP, 10, 1), (NO_OP, 9, 1)
    dump_file.write(str(dump), {
        "last": [last[0].hex(), 10, 1], "prev": [prev[0].hex(), 9, 1], "cluster": [leader],
        "digest": snapshot.digest(), "membership": {"index": 5, "table": table.to_json()}},
        snapshot.snapshot())
    node = RaftNode(SlowRestore(cluster_id=1), RaftOptions(
        self_address=me, peers=(), data_dir=str(tmp_path / "learner"), password="x",
        profile=FAST, members=Table.of([MemberInfo("n1", leader, "", Role.VOTER)], "joining")))
    try:
        h = Harness(node, True)
        peer = h.on_tick(node.internals.transport_nodes)[leader]
        h.on_tick(lambda: node.internals.transport._onNodeConnected(peer))
        h.receive({"type": "append_entries", "term": 1, "commit_index": 10,
                   "serialized": (dump.read_bytes(), True, True)}, peer=peer)
        wait_for(lambda: node.counters["snapshots_loaded"] == 1, "the snapshot to load")
        assert node.membership is not None and node.membership.self_role == "learner"
        assert not wait_for_bool(lambda: node.raftCurrentTerm > 1, 3 * FAST.raft_max_timeout)
    finally:
        node.stop()


def test_promotion_needs_a_learner_in_sync(make_harness: Callable[..., Harness]) -> None:
    """etcd refuses to promote a learner that is not in sync with the leader; so do we (it
    would join every majority while still catching up)."""
    h = make_harness(True)
    h.lead()
    learner = "127.0.0.9:1001"
    membership = h.node.membership
    assert membership is not None
    future = h.on_tick(lambda: membership.add_learner("n9", learner, "127.0.0.9:1002"))
    h.ack_all()
    future.result(TICK_TIMEOUT)
    with pytest.raises(ChangeRefused, match="not in sync"):
        h.on_tick(lambda: membership.promote(learner))
    node = h.on_tick(h.node.internals.transport_nodes)[learner]
    h.on_tick(lambda: h.node.internals.transport._onNodeConnected(node))
    h.ack_all([node])
    h.on_tick(lambda: membership.promote(learner))
    assert learner in h.voters()


def test_a_change_that_would_lose_the_quorum_is_refused(
        make_harness: Callable[..., Harness]) -> None:
    """etcd's strict reconfig check: removing a voter when the voters left that are up would not
    be a majority of the new configuration is refused. Three voters, one peer disconnected:
    removing the other (connected) peer would leave two voters with one up."""
    h = make_harness(True, peers=2)
    h.lead()
    up, down = h.peers
    h.on_tick(lambda: h.node.internals.transport._onNodeDisconnected(down))
    assert not h.request("remove", up.address)
    assert h.request("remove", down.address)


def test_plain_pysyncobj_is_what_the_plain_variant_runs(make_harness: Callable[..., Harness]
                                                        ) -> None:
    """What makes the plain variant plain: PySyncObj's own membership is on and handles the
    messages alone; the fenced node has its own off."""
    plain, fenced = make_harness(False).node, make_harness(True).node
    assert plain.conf.dynamicMembershipChange and plain.membership is None
    assert not fenced.conf.dynamicMembershipChange and fenced.membership is not None
    assert plain.internals.transport._onMessageReceivedCallback == plain._SyncObj__onMessageReceived
    assert _COMMAND_TYPE.MEMBERSHIP == PLAIN_MEMBERSHIP
