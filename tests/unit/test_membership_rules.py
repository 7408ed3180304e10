"""The rules of ``kvstore.node.membership``, one per test, against stand-ins for PySyncObj.

``test_membership_fence.py`` shows each rule on a real ``RaftNode`` (seconds per test); this
file pins down the edges mutation testing found (``make mutate``) in milliseconds: the
``Membership`` object is driven directly, with a fake ``SyncObj`` and fake ``Internals`` that
expose exactly the calls it makes (pure code: no threads, no sockets, no clock but a fake one).

The fake journal rewrites itself through ``clear()`` and ``add()`` on compaction, as
PySyncObj's ``FileJournal`` does: the membership hooks must tell a compaction from a truncation
whatever journal they wrap.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pysyncobj import FAIL_REASON
from pysyncobj.node import TCPNode

from kvstore.node import membership as membership_module
from kvstore.node.dial import DialVia
from kvstore.node.member_table import (
    ENTRY_TYPE,
    ChangeRefused,
    MemberInfo,
    Role,
    Table,
    entry_bytes,
)
from kvstore.node.membership import (
    HEALTHY_WITHIN,
    PROMOTE_MAX_LAG,
    TRANSFER_TIMEOUT,
    Membership,
    MemberView,
)
from kvstore.node.outcomes import NotApplied

ME, B, C, D = (f"127.0.0.1:90{i}" for i in range(1, 5))
LEARNER = "127.0.0.1:9009"
NO_OP = b"\x01"
NOW = 1000.0


def member(address: str, role: Role = Role.VOTER, name: str = "") -> MemberInfo:
    return MemberInfo(name or f"n{address[-1]}", address, address.replace(":90", ":80"), role)


def table(change: str = "test", **roles: Role) -> Table:
    """``table(me=VOTER, b=LEARNER)``: members by the letter of their address."""
    addresses = {"me": ME, "b": B, "c": C, "d": D, "learner": LEARNER}
    return Table.of([member(addresses[k], r) for k, r in roles.items()], change)


V, L, R = Role.VOTER, Role.LEARNER, Role.REMOVED


class FakeJournal:
    """A journal with PySyncObj's interface; compaction rewrites through clear() and add()."""

    def __init__(self, entries: list[tuple[bytes, int, int]]) -> None:
        self.entries = list(entries)

    def add(self, command: bytes, index: int, term: int) -> None:
        self.entries.append((command, index, term))

    def clear(self) -> None:
        self.entries = []

    def deleteEntriesFrom(self, position: int) -> None:  # noqa: N802 - PySyncObj's name
        del self.entries[position:]

    def deleteEntriesTo(self, position: int) -> None:  # noqa: N802
        kept = self.entries[position:]
        self.clear()
        for entry in kept:
            self.add(*entry)

    def __getitem__(self, item: Any) -> Any:
        return self.entries[item]

    def __len__(self) -> int:
        return len(self.entries)


class FakeTransport:
    def __init__(self) -> None:
        self._nodes: set[TCPNode] = set()
        self.delivered: list[tuple[Any, Any]] = []
        self._onMessageReceivedCallback: Callable[[Any, Any], None] = (
            lambda node, message: self.delivered.append((node, message)))

    def setOnMessageReceivedCallback(self, callback: Callable[[Any, Any], None]) -> None:  # noqa: N802
        self._onMessageReceivedCallback = callback


class FakeInternals:
    def __init__(self, entries: list[tuple[bytes, int, int]]) -> None:
        self.raft_log = FakeJournal(entries)
        self.queue: deque[Any] = deque()
        self.match_index: dict[Any, int] = {}
        self.last_response_time: dict[Any, float] = {}
        self.transport = FakeTransport()
        self.voters: set[str] = set()
        self.receivers: set[str] = set()
        self.dropped: list[str] = []
        self.deadline = 5.0
        self.election_timer_restarts = 0
        self.noop: int | None = None

    def transport_nodes(self) -> dict[str, TCPNode]:
        return {n.address: n for n in self.transport._nodes}

    def add_node(self, node: TCPNode) -> None:
        self.transport._nodes.add(node)

    def drop_node(self, node: TCPNode) -> None:
        self.transport._nodes.discard(node)
        self.dropped.append(node.address)

    def set_members(self, voters: set[TCPNode], receivers: set[TCPNode]) -> None:
        self.voters = {n.address for n in voters}
        self.receivers = {n.address for n in receivers}

    def never_campaign(self) -> None:
        self.deadline = math.inf

    def restart_election_timer(self) -> None:
        self.election_timer_restarts += 1
        self.deadline = 5.0

    def leader_noop_index(self) -> int | None:
        return self.noop


class FakeSyncObj:
    def __init__(self, internals: FakeInternals) -> None:
        self.internals = internals
        self.raftCommitIndex = 0
        self.leader = False
        self.leader_node: TCPNode | None = None
        self.connected: set[str] = set()
        self.transferred: list[str] = []
        self.waiting: dict[int, Callable[[Any, int], None]] = {}
        self.term = 1

    def _isLeader(self) -> bool:  # noqa: N802
        return self.leader

    def _getLeader(self) -> TCPNode | None:  # noqa: N802
        return self.leader_node

    def isNodeConnected(self, node: TCPNode) -> bool:  # noqa: N802
        return node.address in self.connected

    def _applyCommand(self, command: bytes, callback: Any, command_type: int) -> None:  # noqa: N802
        self.internals.queue.append((bytes([command_type]) + command, callback))

    def _checkCommandsToApply(self) -> None:  # noqa: N802
        log = self.internals.raft_log
        while self.internals.queue:
            command, callback = self.internals.queue.popleft()
            index = log[-1][1] + 1
            log.add(command, index, self.term)
            self.waiting[index] = callback

    def transferLeadership(self, node: TCPNode) -> None:  # noqa: N802
        self.transferred.append(node.address)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(membership_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


class World:
    """One ``Membership`` and the fakes it drives."""

    def __init__(self, bootstrap: Table, entries: list[tuple[bytes, int, int]] | None = None,
                 dial_via: dict[str, str] | None = None) -> None:
        self.internals = FakeInternals(entries if entries is not None else [(NO_OP, 1, 0)])
        self.syncobj = FakeSyncObj(self.internals)
        self.counters: Counter[str] = Counter()
        self.holds: list[bool] = []
        self.fatal: list[str] = []
        self.m = Membership(self.syncobj, self.internals, self.counters,  # type: ignore[arg-type]
                            self_address=ME, bootstrap=bootstrap, dial_via=dial_via or {},
                            hold=self.holds.append, on_fatal=self.fatal.append)

    @property
    def journal(self) -> FakeJournal:
        return self.internals.raft_log

    def last_index(self) -> int:
        return int(self.journal[-1][1])

    def append(self, command: bytes, term: int = 1) -> int:
        """The journal appends ``command`` at the next index (as PySyncObj does)."""
        index = self.last_index() + 1
        self.journal.add(command, index, term)
        return index

    def node(self, address: str) -> TCPNode:
        return self.internals.transport_nodes()[address]

    def up(self, *addresses: str) -> None:
        """The peers are connected and answered just now."""
        for address in addresses:
            self.syncobj.connected.add(address)
            self.internals.last_response_time[self.node(address)] = NOW

    def acked(self, address: str, index: int) -> None:
        self.internals.match_index[self.node(address)] = index

    def lead(self, *up: str) -> None:
        """Leader whose no-op (the last entry) is committed, with ``up`` connected."""
        self.syncobj.leader = True
        self.internals.noop = self.last_index()
        self.syncobj.raftCommitIndex = self.last_index()
        self.up(*up)

    def commit(self) -> None:
        """Everything in the log commits; the waiting callbacks are told."""
        self.syncobj.raftCommitIndex = self.last_index()
        for callback in self.syncobj.waiting.values():
            callback(None, FAIL_REASON.SUCCESS)
        self.syncobj.waiting.clear()


def three() -> Table:
    return table(me=V, b=V, c=V)


# -- reading the table in effect ------------------------------------------------------------------


def test_self_role_is_joining_until_the_log_holds_a_table(clock: Clock) -> None:
    """A bootstrap that does not list this node (a joining node) says "joining"; a table from
    the log that does not list it says "none" (thesis 4.1: the log decides)."""
    w = World(table(b=V, c=V))
    assert w.m.self_role == "joining" and not w.m.removed
    w.append(entry_bytes(table(b=V, c=V, d=L)))
    assert w.m.self_role == "none" and not w.m.removed


def test_self_role_is_the_role_in_the_table(clock: Clock) -> None:
    w = World(three())
    assert w.m.self_role == "voter"
    w.append(entry_bytes(table(me=L, b=V)))
    assert w.m.self_role == "learner" and not w.m.removed
    w.append(entry_bytes(table(me=R, b=V)))
    assert w.m.self_role == "removed" and w.m.removed


def test_a_snapshot_table_counts_as_from_the_log(clock: Clock) -> None:
    """Thesis 5.1: a snapshot's configuration is the log's, so a node it does not list is
    "none", not "joining"."""
    w = World(table(b=V))
    w.m.on_snapshot_loaded({"index": 7, "table": table(b=V, c=V).to_json()})
    assert w.m.self_role == "none"
    assert w.m.index == 7 and w.m.table.voters == {B, C}


def test_the_bootstrap_is_at_index_zero(clock: Clock) -> None:
    w = World(three())
    assert w.m.index == 0 and w.m.table == three()


def test_a_change_is_pending_until_its_entry_commits(clock: Clock) -> None:
    """Thesis 4.1: a configuration is committed when its entry is."""
    w = World(three())
    index = w.append(entry_bytes(table(me=V, b=V)))
    w.syncobj.raftCommitIndex = index - 1
    assert w.m.change_pending()
    w.syncobj.raftCommitIndex = index
    assert not w.m.change_pending()


def test_api_address_of_a_member_and_of_a_stranger(clock: Clock) -> None:
    w = World(three())
    assert w.m.api_address_of(B) == B.replace(":90", ":80")
    assert w.m.api_address_of(LEARNER) == ""


def test_a_snapshot_records_the_table_in_effect_at_its_index(clock: Clock) -> None:
    """Rule 2 (thesis 5.1): the snapshot at index i records the latest table at or before i,
    with that table's index; later changes are not in it."""
    w = World(three())
    w.append(NO_OP)
    at3 = w.append(entry_bytes(table(me=V, b=V)))
    w.append(NO_OP)
    at5 = w.append(entry_bytes(table(me=V)))
    assert w.m.snapshot_meta(at3 - 1) == {"index": 0, "table": three().to_json()}
    assert w.m.snapshot_meta(at3) == {"index": at3, "table": table(me=V, b=V).to_json()}
    assert w.m.snapshot_meta(at5 - 1)["index"] == at3
    assert w.m.snapshot_meta(at5 + 10)["index"] == at5
    assert w.m.voters_at(at3 - 1) == [ME, B, C]
    assert w.m.voters_at(at3) == [ME, B]


# -- the log's tables (rule 1) --------------------------------------------------------------------


def test_the_tables_already_in_the_log_take_effect_at_start(clock: Clock) -> None:
    """Rule 1 (thesis 4.1): on a restart the latest table in the journal is in effect, and
    PySyncObj is made to follow it before anything runs."""
    entries = [(NO_OP, 1, 0), (entry_bytes(table(me=V, b=V)), 2, 1), (NO_OP, 3, 1),
               (entry_bytes(table(me=V, b=V, d=L)), 4, 1), (NO_OP, 5, 1)]
    w = World(three(), entries)
    assert w.m.index == 4 and w.m.table.receivers == {D}
    assert w.internals.voters == {B} and w.internals.receivers == {D}
    assert set(w.internals.transport_nodes()) == {B, D}
    assert w.counters["membership_entries_appended"] == 2


def test_replaying_the_log_at_start_syncs_once(clock: Clock) -> None:
    """At start PySyncObj is made to follow only the latest table of the log, once: PySyncObj
    set the election timer already, so a learner that the log later made a voter does not
    restart it, and no intermediate table's peers are dialled."""
    entries = [(NO_OP, 1, 0), (entry_bytes(table(me=L, b=V, c=V)), 2, 1),
               (entry_bytes(table(me=V, b=V)), 3, 1)]
    w = World(table(me=V, b=V), entries)
    assert w.internals.election_timer_restarts == 0
    assert set(w.internals.transport_nodes()) == {B} and w.internals.dropped == []


def test_install_builds_the_membership_of_a_node(clock: Clock) -> None:
    internals = FakeInternals([(NO_OP, 1, 0)])
    syncobj, holds, fatal = FakeSyncObj(internals), [], []  # type: ignore[var-annotated]
    m = membership_module.install(
        syncobj, internals, Counter(), self_address=ME, bootstrap=table(me=V, b=V),  # type: ignore[arg-type]
        dial_via={B: "127.0.0.1:7777"}, hold=holds.append, on_fatal=fatal.append)
    assert m.self_address == ME and m.table == table(me=V, b=V)
    assert internals.voters == {B} and internals.transport_nodes()[B].port == 7777
    internals.raft_log.add(bytes([ENTRY_TYPE]), 2, 1)
    assert len(fatal) == 1
    syncobj.leader, internals.noop, syncobj.raftCommitIndex = True, 1, 1
    syncobj.connected.add(B)
    internals.last_response_time[internals.transport_nodes()[B]] = NOW
    m.remove(ME)
    assert holds == [True]


def test_each_change_is_logged(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """The operator's record of the configurations this node used, and of hand-overs."""
    caplog.set_level("INFO", logger="kvstore.node.membership")
    w = World(three())
    w.append(entry_bytes(table(me=V, b=V, c=V, d=L, change="add learner n4")))
    w.lead(B, C)
    w.m.remove(ME)
    assert caplog.messages == ["membership at index 2: add learner n4",
                               f"asked to remove myself: handing leadership over to {C}"]


def test_an_appended_change_takes_effect_at_once(clock: Clock) -> None:
    """Rule 1 (thesis 4.1): a change is in effect when appended, not when committed."""
    w = World(three())
    w.append(NO_OP)
    assert w.m.index == 0 and w.fatal == []
    index = w.append(entry_bytes(table(me=V, b=V, d=L)))
    assert w.m.index == index and w.m.table == table(me=V, b=V, d=L)
    assert w.internals.voters == {B} and w.internals.receivers == {D}
    assert w.internals.dropped == [C]
    assert w.counters["membership_entries_appended"] == 1


def test_a_change_appended_at_an_index_replaces_the_tables_from_there(clock: Clock) -> None:
    """A new entry at index i replaces any table at i or later (a new leader's entry that wins
    over one this node held there)."""
    w = World(three())
    first = w.append(entry_bytes(table(me=V, b=V)))
    second = w.append(entry_bytes(table(me=V)))
    w.journal.add(entry_bytes(table(me=V, c=V)), second, 2)
    assert w.m.index == second and w.m.table == table(me=V, c=V)
    w.journal.add(entry_bytes(table(me=V, d=V)), first, 2)
    assert w.m.index == first and w.m.table == table(me=V, d=V)
    assert w.m.snapshot_meta(second)["index"] == first


def test_an_entry_that_does_not_decode_stops_the_node(clock: Clock) -> None:
    """Fail-stop: a node that cannot read a membership entry cannot know its configuration."""
    w = World(three())
    w.append(bytes([ENTRY_TYPE]) + b"\xff\xff")
    assert len(w.fatal) == 1
    assert w.fatal[0].startswith("membership entry at index 2 does not decode: ")
    assert w.m.table == three() and w.counters["membership_entries_appended"] == 0


def test_a_truncated_change_is_undone(clock: Clock) -> None:
    """Thesis 4.1: a change whose entry is deleted no longer applies; the table before it does,
    and PySyncObj follows at once."""
    w = World(three())
    w.append(NO_OP)
    keep = w.append(entry_bytes(table(me=V, b=V)))
    cut = w.append(entry_bytes(table(me=V, b=V, d=L)))
    w.journal.deleteEntriesFrom(cut - 1)  # positions: entry 1 is at position 0
    assert w.m.index == keep and w.internals.receivers == set()
    w.journal.deleteEntriesFrom(keep - 1)
    assert w.m.index == 0 and w.internals.voters == {B, C}


def test_a_truncation_past_the_end_changes_nothing(clock: Clock) -> None:
    w = World(three())
    index = w.append(entry_bytes(table(me=V, b=V)))
    w.journal.deleteEntriesFrom(len(w.journal))
    assert w.m.index == index


def test_a_cleared_log_falls_back_to_the_base(clock: Clock) -> None:
    """A snapshot that replaces the log (PySyncObj clears it): only the snapshot's table
    remains, and PySyncObj follows it at once."""
    w = World(three())
    w.append(entry_bytes(table(me=V, b=V)))
    w.m.on_snapshot_loaded({"index": 9, "table": table(me=V, d=V).to_json()})
    assert w.m.index == 2  # the log's entry is still the latest
    w.journal.clear()
    assert w.m.index == 9 and w.internals.voters == {D}
    w.journal.add(entry_bytes(table(me=V, c=V)), 10, 2)
    assert w.m.index == 10 and w.internals.voters == {C}


def test_compaction_folds_the_tables_it_drops_into_the_base(clock: Clock) -> None:
    """Compaction is not truncation: the tables of the entries it drops fold into the base, the
    latest at or before the new first entry."""
    w = World(three())
    at2 = w.append(entry_bytes(table(me=V, b=V)))
    w.append(NO_OP)
    at4 = w.append(entry_bytes(table(me=V, d=V)))
    w.append(NO_OP)
    w.journal.deleteEntriesTo(2)  # keeps entries 3..5
    assert w.m.index == at4 and w.internals.voters == {D}
    assert w.m.snapshot_meta(3) == {"index": at2, "table": table(me=V, b=V).to_json()}
    w.journal.deleteEntriesTo(2)  # keeps 5: the change at 4 is now the base
    assert w.m.index == at4
    assert w.m.snapshot_meta(at4)["index"] == at4
    again = w.append(entry_bytes(table(me=V, c=V)))
    assert w.m.index == again and w.internals.voters == {C}, "appends count after compaction"
    assert w.fatal == []


def test_the_compacted_tables_stay_in_effect_when_the_log_is_cleared(clock: Clock) -> None:
    """The base is the table before the log's first entry: compaction moves it up to the
    tables it drops, so a log cleared later (PySyncObj loading a snapshot that records no
    table, one written before membership existed) leaves the compacted table in effect, not
    the bootstrap."""
    w = World(three())
    at2 = w.append(entry_bytes(table(me=V, b=V)))
    w.append(NO_OP)
    w.journal.deleteEntriesTo(2)  # keeps entry 3 only
    w.m.on_snapshot_loaded(None)
    w.journal.clear()
    assert w.m.index == at2 and w.internals.voters == {B}


def test_compaction_keeps_the_change_at_the_first_kept_entry(clock: Clock) -> None:
    w = World(three())
    w.append(NO_OP)
    at3 = w.append(entry_bytes(table(me=V, b=V)))
    w.journal.deleteEntriesTo(2)  # the first kept entry is the change at 3
    assert w.m.index == at3
    w.journal.deleteEntriesFrom(0)  # a truncation of all of it: back to the bootstrap
    assert w.m.index == 0


def test_compaction_of_nothing_changes_nothing(clock: Clock) -> None:
    w = World(three())
    index = w.append(entry_bytes(table(me=V, b=V)))
    w.journal.deleteEntriesTo(len(w.journal))
    assert w.m.index == index


def test_a_snapshot_without_a_table_keeps_the_bootstrap(clock: Clock) -> None:
    w = World(table(b=V))
    w.m.on_snapshot_loaded(None)
    assert w.m.self_role == "joining" and w.m.index == 0


def test_a_loaded_snapshot_is_followed_at_the_end_of_the_tick_not_before(clock: Clock) -> None:
    """The entries after a snapshot may be a divergent tail about to go: PySyncObj is made to
    follow the snapshot's table on the next tick, not while the message is handled."""
    w = World(three())
    w.m.on_snapshot_loaded({"index": 4, "table": table(me=V, d=V).to_json()})
    assert w.internals.voters == {B, C}
    w.m.on_tick()
    assert w.internals.voters == {D}


# -- PySyncObj follows the table ---------------------------------------------------------------


def test_pysyncobj_follows_the_voters_and_receivers(clock: Clock) -> None:
    """Voters count (``otherNodes``), learners and the just removed are sent the log only."""
    w = World(table(me=V, b=V, c=L, d=R))
    assert w.internals.voters == {B}
    assert w.internals.receivers == {C, D}
    assert set(w.internals.transport_nodes()) == {B, C, D}


def test_new_peers_are_dialled_via_their_proxy(clock: Clock) -> None:
    w = World(table(me=V, b=V), dial_via={B: "127.0.0.1:7777"})
    node = w.node(B)
    assert isinstance(node, DialVia) and node.port == 7777


def test_a_table_already_followed_is_not_synced_again(clock: Clock) -> None:
    w = World(three())
    w.internals.voters = set()
    w.m.sync()
    assert w.internals.voters == set()


def test_a_node_that_is_not_a_voter_never_campaigns(clock: Clock) -> None:
    """Rule 5: a learner, a removed member and a stranger push their election deadline out of
    reach, on each sync, each tick and after each message."""
    for bootstrap in (table(me=L, b=V), table(me=R, b=V), table(b=V)):
        w = World(bootstrap)
        assert w.internals.deadline == math.inf
        w.internals.deadline = 1.0
        w.m.on_tick()
        assert w.internals.deadline == math.inf
        w.internals.deadline = 1.0
        w.internals.transport._onMessageReceivedCallback(w.node(B), {"type": "timeout_now"})
        assert w.internals.deadline == math.inf


def test_a_voter_campaigns_as_usual(clock: Clock) -> None:
    w = World(three())
    w.m.on_tick()
    w.internals.transport._onMessageReceivedCallback(w.node(B), {"type": "append_entries"})
    assert w.internals.deadline == 5.0 and w.internals.election_timer_restarts == 0
    assert len(w.internals.transport.delivered) == 1


def test_a_promoted_node_starts_its_election_timer(clock: Clock) -> None:
    """A learner made voter must be able to campaign: its deadline (pushed out of reach while
    it was a learner) is set again. Not at start, where PySyncObj set it already."""
    w = World(table(me=L, b=V))
    assert w.internals.election_timer_restarts == 0
    w.append(entry_bytes(table(me=V, b=V)))
    assert w.internals.election_timer_restarts == 1 and w.internals.deadline == 5.0
    w.append(entry_bytes(table(me=V, b=V, c=L)))
    assert w.internals.election_timer_restarts == 1


def test_vote_requests_of_a_removed_member_are_ignored(clock: Clock) -> None:
    """Thesis 4.2.3: a removed server's RequestVote must not disrupt the cluster."""
    w = World(table(me=V, b=V, c=R))
    transport = w.internals.transport
    transport._onMessageReceivedCallback(w.node(C), {"type": "request_vote", "term": 9})
    transport._onMessageReceivedCallback(w.node(C), {"type": "request_vote", "term": 10})
    assert transport.delivered == []
    assert w.counters["membership_vote_requests_of_removed_ignored"] == 2
    for sender, message in ((w.node(B), {"type": "request_vote", "term": 9}),
                            (w.node(C), {"type": "append_entries", "term": 9}),
                            (w.node(C), "not a dict")):
        transport._onMessageReceivedCallback(sender, message)
    assert len(transport.delivered) == 3
    transport._onMessageReceivedCallback(object(), {"type": "request_vote"})
    assert len(transport.delivered) == 4


# -- changes: one at a time (rule 3) ------------------------------------------------------------


def test_only_the_leader_changes_the_membership(clock: Clock) -> None:
    w = World(three())
    with pytest.raises(NotApplied) as refusal:
        w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    assert refusal.value.reason == "NOT_LEADER"
    assert str(refusal.value) == "NOT_LEADER: membership changes go to the leader"


def test_a_change_waits_for_an_entry_of_the_leaders_term(clock: Clock) -> None:
    """Thesis 4.1 (the 2015 correction): only once the leader's no-op is committed."""
    w = World(three())
    w.lead(B, C)
    w.append(NO_OP)
    w.internals.noop = w.last_index()
    with pytest.raises(NotApplied, match="MEMBERSHIP_BUSY: the new leader has not committed an "
                       r"entry of its term yet \(thesis 4.1\); retry"):
        w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    w.internals.noop = None
    with pytest.raises(NotApplied, match="not committed an entry of its term"):
        w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    w.internals.noop = w.last_index()
    w.syncobj.raftCommitIndex = w.last_index()
    w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")


def test_one_change_at_a_time(clock: Clock) -> None:
    """Thesis 4.1: no change begins until the previous one is committed."""
    w = World(three())
    w.lead(B, C)
    future = w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    with pytest.raises(NotApplied) as refusal:
        w.m.remove(C)
    assert refusal.value.reason == "MEMBERSHIP_BUSY"
    assert str(refusal.value) == (f"MEMBERSHIP_BUSY: the change 'add learner n9 ({LEARNER})' "
                                  "is not committed yet: one change at a time; retry")
    w.commit()
    assert future.result(0) == w.m.table
    w.m.remove(C)
    assert w.counters["membership_changes_proposed"] == 2


def test_a_change_in_the_log_not_yet_committed_blocks_the_next(clock: Clock) -> None:
    """Also a change this leader did not propose (a previous leader's, still uncommitted)."""
    w = World(three())
    w.lead(B, C)
    w.append(entry_bytes(table(me=V, b=V, c=V, d=L)))
    with pytest.raises(NotApplied, match="one change at a time"):
        w.m.remove(C)


def test_a_change_whose_future_is_unresolved_blocks_the_next(clock: Clock) -> None:
    """Committed but its callback not yet run: still in flight."""
    w = World(three())
    w.lead(B, C)
    w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    w.syncobj.raftCommitIndex = w.last_index()
    with pytest.raises(NotApplied, match="one change at a time"):
        w.m.remove(C)


def test_a_change_waits_for_the_queued_proposals(clock: Clock) -> None:
    """The checks hold for the entry only if it is appended in this tick, right after them."""
    w = World(three())
    w.lead(B, C)
    w.internals.queue.append((b"x", None))
    with pytest.raises(NotApplied) as refusal:
        w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    assert str(refusal.value) == "MEMBERSHIP_BUSY: proposals are queued; retry"


def test_a_change_is_one_entry_appended_now(clock: Clock) -> None:
    """The whole new table, as one membership entry, at the end of the log."""
    w = World(three())
    w.lead(B, C)
    w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    command, index, _ = w.journal[-1]
    assert command == entry_bytes(three().with_learner("n9", LEARNER, "127.0.0.1:8009"))
    assert w.m.index == index
    assert w.counters["membership_changes_proposed"] == 1
    assert w.internals.receivers == {LEARNER}


def test_a_change_not_appended_in_the_same_tick_is_an_error(clock: Clock) -> None:
    w = World(three())
    w.lead(B, C)
    w.syncobj._checkCommandsToApply = lambda: None  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="^the membership entry was not appended in the same "
                       "tick$"):
        w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    assert w.counters["membership_changes_proposed"] == 0


def test_an_overwritten_change_fails_its_future(clock: Clock) -> None:
    """A change whose index a new leader's entry took never applies: NotApplied (retry)."""
    w = World(three())
    w.lead(B, C)
    future = w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    (callback,) = w.syncobj.waiting.values()
    callback(None, FAIL_REASON.DISCARDED)
    with pytest.raises(NotApplied) as failure:
        future.result(0)
    assert str(failure.value) == "DISCARDED: the change was overwritten"


# -- changes: no quorum lost (rule 4) -------------------------------------------------------------


def test_a_learner_changes_no_quorum_and_needs_none(clock: Clock) -> None:
    """etcd's strict reconfig check only looks at changes to the voters."""
    w = World(three())
    w.lead()  # no peer up
    w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")


def test_a_change_that_would_lose_the_quorum_is_refused(clock: Clock) -> None:
    """etcd's strict reconfig check: the voters of the new table that are up must be a
    majority of them. Three voters, C down: removing B leaves {me, C}, one of two up."""
    w = World(three())
    w.lead(B)
    with pytest.raises(ChangeRefused) as refusal:
        w.m.remove(B)
    assert str(refusal.value) == ("refused: after 'remove n2' the cluster would have 2 voters "
                                  "of which only 1 are up, not a majority; bring members back "
                                  "first")
    w.m.remove(C)  # leaves {me, B}, both up


def test_exactly_half_up_is_not_a_majority(clock: Clock) -> None:
    """Promoting a learner with one of the other two voters down: two of the four voters up is
    half, not a majority."""
    w = World(table(me=V, b=V, c=V, learner=L))
    w.lead(B)
    w.up(LEARNER)
    w.acked(LEARNER, w.last_index())
    w.syncobj.connected.discard(B)
    with pytest.raises(ChangeRefused, match="4 voters of which only 2 are up"):
        w.m.promote(LEARNER)
    w.syncobj.connected.add(B)
    w.m.promote(LEARNER)


def test_a_peer_is_healthy_if_connected_and_heard_from_lately(clock: Clock) -> None:
    """The leader counts a peer as up only if it is connected and answered within
    HEALTHY_WITHIN seconds; itself always."""
    w = World(three())
    w.lead(B)
    assert w.m.healthy(ME) and w.m.healthy(B)
    assert not w.m.healthy(C)  # not connected
    assert not w.m.healthy(LEARNER)  # not a peer
    w.syncobj.connected.add(C)
    w.internals.last_response_time.pop(w.node(C), None)
    assert not w.m.healthy(C)  # connected, never heard from
    clock.now = NOW + HEALTHY_WITHIN - 0.001
    assert w.m.healthy(B)
    clock.now = NOW + HEALTHY_WITHIN
    assert not w.m.healthy(B)


# -- promotion (rule 4) ---------------------------------------------------------------------------


def learner_world(clock: Clock) -> World:
    w = World(table(me=V, b=V, c=V, learner=L))
    w.lead(B, C)
    return w


def test_promotion_needs_a_learner_within_the_lag(clock: Clock) -> None:
    """etcd: a learner is promoted only when in sync; here within PROMOTE_MAX_LAG entries of
    the commit index (inclusive), and connected."""
    w = learner_world(clock)
    w.syncobj.raftCommitIndex = PROMOTE_MAX_LAG + 50
    w.up(LEARNER)
    w.acked(LEARNER, 49)
    assert not w.m.in_sync(LEARNER)
    with pytest.raises(ChangeRefused) as refusal:
        w.m.promote(LEARNER)
    assert str(refusal.value) == (f"learner n9 is not in sync with the leader (match index 49, "
                                  f"commit index {PROMOTE_MAX_LAG + 50}, connected True): wait "
                                  "until it catches up")
    w.acked(LEARNER, 50)
    assert w.m.in_sync(LEARNER)
    w.internals.noop = 1
    w.m.promote(LEARNER)
    assert w.internals.voters == {B, C, LEARNER}


def test_promotion_needs_a_connected_learner(clock: Clock) -> None:
    w = learner_world(clock)
    w.acked(LEARNER, w.syncobj.raftCommitIndex)
    assert not w.m.in_sync(LEARNER)
    with pytest.raises(ChangeRefused, match=r"connected False\): wait"):
        w.m.promote(LEARNER)


def test_promoting_a_stranger_is_refused_by_the_table(clock: Clock) -> None:
    w = learner_world(clock)
    with pytest.raises(ChangeRefused, match="is not a member"):
        w.m.promote(D)


def test_a_refusal_names_the_member_by_label(clock: Clock) -> None:
    w = learner_world(clock)
    with pytest.raises(ChangeRefused) as refusal:
        w.m._require_in_sync(D)
    assert str(refusal.value) == (f"learner {D} is not in sync with the leader (match index 0, "
                                  "commit index 1, connected False): wait until it catches up")


def test_the_leaders_match_index_is_its_last_entry(clock: Clock) -> None:
    w = learner_world(clock)
    w.append(NO_OP)
    w.acked(B, 2)
    views = {v.info.raft_address: v for v in w.m.views()}
    assert views[ME].match_index == w.last_index()
    assert views[B].match_index == 2
    assert views[C].match_index == 0


# -- the leader removes itself (rule 7) -----------------------------------------------------------


def test_the_leader_asked_to_remove_itself_hands_over_first(clock: Clock) -> None:
    """Thesis 4.2.2: the leader stops proposing and sends timeout_now to the voter that holds
    the most of its log once it holds all of it; the new leader removes it."""
    w = World(three())
    w.lead(B, C)
    w.append(NO_OP)
    w.acked(B, w.last_index() - 1)
    w.acked(C, w.last_index() - 1)
    future = w.m.remove(ME)
    assert w.holds == [True] and w.counters["membership_leader_handovers"] == 1
    assert w.m.table == three(), "no entry: the new leader removes it"
    w.m.on_tick()
    assert w.syncobj.transferred == []  # C (the larger address on a tie) is behind
    w.acked(C, w.last_index())
    w.m.on_tick()
    assert w.syncobj.transferred == [C]
    w.m.on_tick()
    assert w.syncobj.transferred == [C], "timeout_now is sent once"
    w.syncobj.leader = False
    w.m.on_tick()
    with pytest.raises(NotApplied) as outcome:
        future.result(0)
    assert str(outcome.value) == (f"LEADERSHIP_TRANSFERRED: this node handed its leadership to "
                                  f"{C}: remove it there")
    assert w.holds == [True, False]
    with pytest.raises(NotApplied, match="NOT_LEADER"):
        w.m.remove(B)


def test_the_hand_over_target_is_the_voter_with_the_most_log(clock: Clock) -> None:
    w = World(three())
    w.lead(B, C)
    w.acked(B, w.last_index())
    w.acked(C, w.last_index() - 1)
    w.m.remove(ME)
    w.m.on_tick()
    assert w.syncobj.transferred == [B]


def test_while_handing_over_no_change_is_made(clock: Clock) -> None:
    w = World(three())
    w.lead(B, C)
    w.m.remove(ME)
    with pytest.raises(NotApplied) as refusal:
        w.m.remove(B)
    assert str(refusal.value) == "TRANSFERRING_LEADERSHIP: the leader is handing over"
    with pytest.raises(NotApplied, match="TRANSFERRING_LEADERSHIP"):
        w.m.remove(ME)


def test_a_hand_over_that_takes_too_long_fails(clock: Clock) -> None:
    w = World(three())
    w.lead(B, C)
    future = w.m.remove(ME)
    clock.now = NOW + TRANSFER_TIMEOUT
    w.m.on_tick()
    assert not future.done()
    clock.now = NOW + TRANSFER_TIMEOUT + 0.001
    w.m.on_tick()
    assert w.counters["membership_leader_handovers"] == 1
    with pytest.raises(NotApplied) as outcome:
        future.result(0)
    assert str(outcome.value) == ("TRANSFER_FAILED: the leader could not hand over in time; "
                                  "retry")
    assert w.holds == [True, False]
    w.m.on_tick()  # the transfer is over: nothing more happens
    with pytest.raises(ChangeRefused, match="not a majority"):  # not TRANSFERRING_LEADERSHIP
        w.m.remove(C)  # (and the peers fell silent meanwhile)
    w.up(B, C)
    clock.now = NOW
    w.m.remove(ME)
    assert w.counters["membership_leader_handovers"] == 2


def test_the_leader_cannot_hand_over_to_nobody(clock: Clock) -> None:
    w = World(three())
    w.lead()
    with pytest.raises(ChangeRefused) as refusal:
        w.m.remove(ME)
    assert str(refusal.value) == "the leader cannot hand over: no other voter is up"
    assert w.holds == []


def test_the_last_voter_cannot_remove_itself(clock: Clock) -> None:
    w = World(table(me=V, learner=L))
    w.lead(LEARNER)
    with pytest.raises(ChangeRefused, match="the last voter"):
        w.m.remove(ME)


def test_a_hand_over_that_would_lose_the_quorum_is_refused(clock: Clock) -> None:
    """Removing the leader is a change like any other: {B, C, D} with only B up is refused."""
    w = World(table(me=V, b=V, c=V, d=V))
    w.lead(B)
    with pytest.raises(ChangeRefused, match="not a majority"):
        w.m.remove(ME)
    assert w.holds == []


def test_a_hand_over_needs_a_free_leader(clock: Clock) -> None:
    w = World(three())
    w.lead(B, C)
    w.m.add_learner("n9", LEARNER, "127.0.0.1:8009")
    with pytest.raises(NotApplied, match="one change at a time"):
        w.m.remove(ME)


def test_a_follower_asked_to_remove_itself_proposes_nothing(clock: Clock) -> None:
    w = World(three())
    with pytest.raises(NotApplied, match="NOT_LEADER"):
        w.m.remove(ME)
    assert w.holds == []


# -- views ----------------------------------------------------------------------------------------


def test_the_views_on_the_leader(clock: Clock) -> None:
    """``kv member list`` on the leader: who leads, who is connected, match indexes, and which
    learners are in sync."""
    w = World(table(me=V, b=V, c=L, d=L))
    w.lead(C)
    w.syncobj.leader_node = TCPNode(ME)
    w.acked(C, w.last_index())
    w.acked(B, 1)
    assert w.m.views() == [
        MemberView(member(ME), is_self=True, is_leader=True, match_index=1, connected=True,
                   in_sync=False),
        MemberView(member(B), is_self=False, is_leader=False, match_index=1, connected=False,
                   in_sync=False),
        MemberView(member(C, L), is_self=False, is_leader=False, match_index=1, connected=True,
                   in_sync=True),
        MemberView(member(D, L), is_self=False, is_leader=False, match_index=0,
                   connected=False, in_sync=False),
    ]


def test_the_views_on_a_follower(clock: Clock) -> None:
    """A follower knows no match indexes but its own, and no learner is in sync for it."""
    w = World(table(me=V, b=V, c=L))
    w.syncobj.leader_node = w.node(B)
    w.up(B, C)
    w.acked(B, 7)  # left over from when this node led
    w.acked(C, 1)
    w.internals.transport._nodes.discard(w.node(C))
    assert w.m.views() == [
        MemberView(member(ME), is_self=True, is_leader=False, match_index=1, connected=True,
                   in_sync=False),
        MemberView(member(B), is_self=False, is_leader=True, match_index=0, connected=True,
                   in_sync=False),
        MemberView(member(C, L), is_self=False, is_leader=False, match_index=0,
                   connected=False, in_sync=False),
    ]


def test_the_views_without_a_leader(clock: Clock) -> None:
    w = World(table(me=V, b=V))
    assert [v.is_leader for v in w.m.views()] == [False, False]
