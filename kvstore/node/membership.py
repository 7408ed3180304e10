"""Membership changes on PySyncObj: the configuration a node uses is a function of its log.

The rules this module enforces (Raft thesis chapter 4; etcd's learners and strict reconfig
check), each against a defect of PySyncObj 0.3.17's own dynamic membership (M1-M7 in the README):

1. **The log is the source of truth** (thesis 4.1). A node uses the member table of the latest
   membership entry in its log, committed or not: it takes effect when the entry is appended,
   on the leader and on followers alike, and is undone when the entry is truncated. On a
   restart it comes back from the snapshot and the journal; the command line's peers only
   bootstrap a log that holds no table (etcd's --initial-cluster). (M2: PySyncObj restarts
   with the constructor's peers and replays later changes only when they commit.)
2. **The table stored with a snapshot is the one in effect at the snapshot's index** (M3:
   PySyncObj hands the serializer its current configuration, which may include changes
   appended after that index and later truncated).
3. **One change at a time** (thesis 4.1): a leader appends a change only when the previous one
   is committed, and only once it has committed an entry of its own term (M1: PySyncObj's guard,
   ``__changeClusterIDx``, is never set, so a second change goes in before the first commits).
4. **No change costs the quorum** (etcd's strict reconfig check): the voters of the new table
   that the leader hears from must be a majority of them; a learner is promoted only when it is
   connected and within ``PROMOTE_MAX_LAG`` entries of the commit index.
5. **Only voters campaign.** A learner, a removed member, and a node that is not (yet) in its
   table never start an election and ignore a ``timeout_now``.
6. **A removed member learns of its removal** and stops serving (M5: PySyncObj's leader stops
   sending to a member the moment it appends its removal, so the member never receives it and
   keeps serving and campaigning). The table of the removing change lists it as REMOVED; it is
   sent the log until the next change. Vote requests from it are ignored (thesis 4.2.3).
7. **The leader is removed after it hands over** (thesis 4.2.2; M4: PySyncObj refuses to
   remove the leader). It stops proposing, waits until a voter holds its whole log, sends it
   ``timeout_now``, and the new leader removes it.
8. **Learners have names** (M6: PySyncObj's read-only nodes are anonymous, get a new identity
   and a match index of 0 on every reconnection, and have no port, so they cannot be promoted
   or listed). A learner here is a named node in every member's transport and in PySyncObj's
   ``readonlyNodes``: it is sent the log and its match index is tracked, but PySyncObj counts
   only ``otherNodes`` (the voters) in elections and commits.

PySyncObj's own ``dynamicMembershipChange`` is therefore off, and its membership code never
runs. What we keep of PySyncObj is what it does right: quorums counted over ``otherNodes``, the
append loop over ``readonlyNodes``, snapshot transfer, the new leader's no-op, ``transferLeadership``
and the transport's ``addNode``/``dropNode``. Membership entries are log entries of a type of
their own (``member_table.ENTRY_TYPE``) holding the whole table as protobuf; PySyncObj appends
them like any entry and applies them as nothing.

Everything here runs on the tick thread, except the reads marked thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj
from pysyncobj.node import TCPNode

from kvstore.node import dial
from kvstore.node.internals import Internals
from kvstore.node.member_table import (
    ENTRY_TYPE,
    ChangeRefused,
    MemberInfo,
    Role,
    Table,
    is_membership_entry,
)
from kvstore.node.outcomes import NotApplied

log = logging.getLogger("kvstore.node.membership")

PROMOTE_MAX_LAG = 100
"""A learner is promoted only when its match index is at most this many log entries behind the
leader's commit index (etcd: 90% of the leader's index; an absolute bound is stricter on long
logs). One entry is one batch of up to 1,024 writes, so this is a fraction of a second of
catching up."""
HEALTHY_WITHIN = 2.0
"""Seconds since a peer's last answer within which the leader counts it as up (the shipped
profile's ``leaderFallbackTimeout``)."""
TRANSFER_TIMEOUT = 3.0
"""How long a leader asked to remove itself tries to hand over before giving up."""

Hold = Callable[[bool], None]
"""Holds back (True) or releases (False) the node's waiting proposals."""


@dataclass
class _Transfer:
    """A leader handing over before its own removal (rule 7)."""

    target: TCPNode
    deadline: float
    future: Future[Table]
    sent: bool = False


@dataclass(frozen=True)
class MemberView:
    """One member as this node sees it (for status and ``kv member list``)."""

    info: MemberInfo
    is_self: bool
    is_leader: bool
    match_index: int
    connected: bool
    in_sync: bool


@dataclass
class _Log:
    """The tables in the log: ``base`` (from the snapshot, or the bootstrap at index 0) and one
    per membership entry still in the log, ascending index; each with the index of its entry."""

    base: tuple[int, Table]
    changes: list[tuple[int, Table]] = field(default_factory=list)

    def latest(self) -> tuple[int, Table]:
        return self.changes[-1] if self.changes else self.base

    def at(self, index: int) -> tuple[int, Table]:
        for change in reversed(self.changes):
            if change[0] <= index:
                return change
        return self.base


class Membership:
    """Keeps PySyncObj's voters and receivers equal to the table in effect in the log."""

    def __init__(self, syncobj: SyncObj, internals: Internals, counters: Counter[str], *,
                 self_address: str, bootstrap: Table, dial_via: Mapping[str, str],
                 hold: Hold, on_fatal: Callable[[str], None]) -> None:
        self._syncobj = syncobj
        self._internals = internals
        self._counters = counters
        self.self_address = self_address
        self._dial_via = dict(dial_via)
        self._hold = hold
        self._on_fatal = on_fatal
        self._lock = threading.Lock()  # the tables may be read by a snapshot off the tick thread
        self._log = _Log((0, bootstrap))
        self._from_log = False
        """Whether the table in effect came from a snapshot or an entry (not the bootstrap)."""
        self._compacting = False
        self._sync_pending = False
        self._synced: Table | None = None
        self._voter = False
        self._inflight: Future[Table] | None = None
        self._transfer: _Transfer | None = None
        self._latest = self._log.latest()
        """(index, table) in effect: replaced whole, so any thread may read it."""
        for command, index, _term in internals.raft_log[:]:
            if is_membership_entry(command):
                self._appended(index, command, sync=False)
        self._install_journal_hooks()
        self._install_message_filter()
        self.sync()

    # -- reading (thread-safe) -----------------------------------------------------------------

    @property
    def table(self) -> Table:
        return self._latest[1]

    @property
    def index(self) -> int:
        """The log index of the entry that made the table in effect (0: the bootstrap's)."""
        return self._latest[0]

    @property
    def self_role(self) -> str:
        """voter, learner, removed, joining (a bootstrap that does not list us) or none."""
        role = self.table.role_of(self.self_address)
        if role is not None:
            return role.value
        return "none" if self._from_log else "joining"

    @property
    def removed(self) -> bool:
        return self.self_role == Role.REMOVED.value

    def change_pending(self) -> bool:
        return self.index > self._syncobj.raftCommitIndex

    def api_address_of(self, raft_address: str) -> str:
        member = self.table.get(raft_address)
        return member.api_address if member is not None else ""

    def snapshot_meta(self, index: int) -> dict[str, Any]:
        """What the snapshot at ``index`` records: the table in effect there (rule 2)."""
        with self._lock:
            at, table = self._log.at(index)
        return {"index": at, "table": table.to_json()}

    def voters_at(self, index: int) -> list[str]:
        with self._lock:
            return sorted(self._log.at(index)[1].voters)

    # -- the log's tables (rules 1 and 2) --------------------------------------------------------

    def on_snapshot_loaded(self, meta: dict[str, Any] | None) -> None:
        """Called by the deserializer when a snapshot replaces the state: its table is the one
        before the log that follows it. A snapshot written before membership existed has none;
        the bootstrap stays."""
        if meta is None:
            return
        with self._lock:
            self._log.base = (int(meta["index"]), Table.from_json(meta["table"]))
            self._from_log = True
            self._latest = self._log.latest()
        # PySyncObj clears the log next if the snapshot replaces it (and we sync then); if it
        # keeps the log, the end of this tick syncs. Not now: the entries still in the log may
        # be a divergent tail about to go, and following them would drop the leader.
        self._sync_pending = True

    def _install_journal_hooks(self) -> None:
        journal = self._internals.raft_log
        add, clear = journal.add, journal.clear
        delete_from, delete_to = journal.deleteEntriesFrom, journal.deleteEntriesTo

        def on_add(command: bytes, index: int, term: int) -> None:
            add(command, index, term)
            if not self._compacting and is_membership_entry(command):
                self._appended(index, command)

        def on_clear() -> None:
            clear()
            if not self._compacting:
                with self._lock:
                    self._log.changes = []
                    self._latest = self._log.latest()
                self.sync()

        def on_delete_from(position: int) -> None:
            cut = journal[position][1] if position < len(journal) else None
            delete_from(position)
            if cut is not None:
                with self._lock:
                    self._log.changes = [c for c in self._log.changes if c[0] < cut]
                    self._latest = self._log.latest()
                self.sync()

        def on_delete_to(position: int) -> None:
            # Compaction: FileJournal rewrites itself through clear() and add(), which must not
            # look like a truncation. The tables of entries now gone fold into the base.
            first = journal[position][1] if position < len(journal) else None
            self._compacting = True
            try:
                delete_to(position)
            finally:
                self._compacting = False
            if first is not None:
                with self._lock:
                    self._log.base = self._log.at(first - 1)
                    self._log.changes = [c for c in self._log.changes if c[0] >= first]
                    self._latest = self._log.latest()

        journal.add, journal.clear = on_add, on_clear
        journal.deleteEntriesFrom, journal.deleteEntriesTo = on_delete_from, on_delete_to

    def _appended(self, index: int, command: bytes, sync: bool = True) -> None:
        try:
            table = Table.from_entry(command[1:])
        except ValueError as exc:
            # Only our own code writes these entries, under the cluster secret: a node that
            # cannot read one cannot know its configuration, so it stops (fail-stop, like D5).
            self._on_fatal(f"membership entry at index {index} does not decode: {exc}")
            return
        with self._lock:
            self._log.changes = [c for c in self._log.changes if c[0] < index]
            self._log.changes.append((index, table))
            self._from_log = True
            self._latest = self._log.latest()
        self._counters["membership_entries_appended"] += 1
        log.info("membership at index %d: %s", index, table.change)
        if sync:
            self.sync()

    # -- making PySyncObj follow the table --------------------------------------------------------

    def sync(self) -> None:
        """Makes PySyncObj's voters, receivers and transport those of the table in effect."""
        self._sync_pending = False
        table = self.table
        if table is self._synced:
            return
        me, internals = self.self_address, self._internals
        voters, receivers = table.voters - {me}, table.receivers - {me}
        known = internals.transport_nodes()
        for address in sorted(set(known) - voters - receivers):
            internals.drop_node(known[address])
        for address in sorted((voters | receivers) - set(known)):
            internals.add_node(dial.node(address, self._dial_via))
        nodes = internals.transport_nodes()
        internals.set_members({nodes[a] for a in voters}, {nodes[a] for a in receivers})
        was_voter, self._voter = self._voter, table.role_of(me) is Role.VOTER
        if not self._voter:
            internals.never_campaign()
        elif not was_voter and self._synced is not None:
            internals.restart_election_timer()
        self._synced = table

    def _install_message_filter(self) -> None:
        transport = self._internals.transport
        original = transport._onMessageReceivedCallback

        def on_message(node: Any, message: Any) -> None:
            if (type(message) is dict and message.get("type") == "request_vote"
                    and self.table.role_of(getattr(node, "address", "")) is Role.REMOVED):
                self._counters["membership_vote_requests_of_removed_ignored"] += 1
                return
            original(node, message)
            if not self._voter:
                self._internals.never_campaign()  # a heartbeat or a timeout_now re-armed it

        transport.setOnMessageReceivedCallback(on_message)

    def on_tick(self) -> None:
        """Runs at the end of every tick (a ``RaftNode`` tick hook)."""
        if self._sync_pending:
            self.sync()
        if not self._voter:
            self._internals.never_campaign()
        if self._transfer is not None:
            self._step_transfer()

    # -- changing it (leader only; rules 3, 4 and 7) ------------------------------------------------

    def add_learner(self, name: str, raft_address: str, api_address: str) -> Future[Table]:
        return self._change(lambda t: t.with_learner(name, raft_address, api_address))

    def promote(self, raft_address: str) -> Future[Table]:
        return self._change(lambda t: t.promoted(raft_address), promoting=raft_address)

    def remove(self, raft_address: str) -> Future[Table]:
        if raft_address == self.self_address and self._syncobj._isLeader():
            return self._hand_over()
        return self._change(lambda t: t.without(raft_address))

    def _change(self, build: Callable[[Table], Table], promoting: str | None = None
                ) -> Future[Table]:
        """Appends one change now, or raises: ``NotApplied`` (not the leader, or busy: retry),
        ``ChangeRefused`` (this change must not be made). The future is resolved at commit."""
        syncobj, internals = self._syncobj, self._internals
        self._refuse_unless_free()
        current = self.table
        new = build(current)
        if promoting is not None:
            self._require_in_sync(promoting)
        self._require_quorum(current, new)
        if internals.queue:
            raise NotApplied("MEMBERSHIP_BUSY", "proposals are queued; retry")
        future: Future[Table] = Future()

        def committed(_result: Any, error: int) -> None:
            if error == FAIL_REASON.SUCCESS:
                future.set_result(new)
            else:  # DISCARDED: another entry won this index; ours will never apply
                future.set_exception(NotApplied("DISCARDED", "the change was overwritten"))

        syncobj._applyCommand(new.to_entry(), committed, ENTRY_TYPE)
        syncobj._checkCommandsToApply()  # appends it now: the checks above still hold
        if internals.raft_log[-1][0][1:] != new.to_entry():
            raise RuntimeError("the membership entry was not appended in the same tick")
        self._inflight = future
        self._counters["membership_changes_proposed"] += 1
        return future

    def _refuse_unless_free(self) -> None:
        syncobj = self._syncobj
        if not syncobj._isLeader():
            raise NotApplied("NOT_LEADER", "membership changes go to the leader")
        if self._transfer is not None:
            raise NotApplied("TRANSFERRING_LEADERSHIP", "the leader is handing over")
        if not self._committed_in_term():
            raise NotApplied("MEMBERSHIP_BUSY", "the new leader has not committed an entry of "
                             "its term yet (thesis 4.1); retry")
        if (self._inflight is not None and not self._inflight.done()) or self.change_pending():
            raise NotApplied("MEMBERSHIP_BUSY", f"the change '{self.table.change}' is not "
                             "committed yet: one change at a time; retry")

    def _committed_in_term(self) -> bool:
        noop = self._internals.leader_noop_index()
        return noop is not None and self._syncobj.raftCommitIndex >= noop

    def healthy(self, address: str) -> bool:
        """The leader has heard from ``address`` within HEALTHY_WITHIN seconds."""
        if address == self.self_address:
            return True
        node = self._internals.transport_nodes().get(address)
        if node is None or not self._syncobj.isNodeConnected(node):
            return False
        heard = self._internals.last_response_time.get(node)
        return heard is not None and time.monotonic() - heard < HEALTHY_WITHIN

    def _match(self, address: str) -> int:
        if address == self.self_address:
            return int(self._internals.raft_log[-1][1])
        node = self._internals.transport_nodes().get(address)
        return self._internals.match_index.get(node, 0) if node is not None else 0

    def in_sync(self, address: str) -> bool:
        return (self.healthy(address)
                and self._match(address) >= self._syncobj.raftCommitIndex - PROMOTE_MAX_LAG)

    def _require_in_sync(self, address: str) -> None:
        if not self.in_sync(address):
            member = self.table.get(address)
            label = member.label if member is not None else address
            raise ChangeRefused(
                f"learner {label} is not in sync with the leader (match index "
                f"{self._match(address)}, commit index {self._syncobj.raftCommitIndex}, "
                f"connected {self.healthy(address)}): wait until it catches up")

    def _require_quorum(self, current: Table, new: Table) -> None:
        if new.voters == current.voters:
            return
        up = sorted(a for a in new.voters if self.healthy(a))
        if len(up) <= len(new.voters) / 2:
            raise ChangeRefused(
                f"refused: after '{new.change}' the cluster would have {len(new.voters)} voters "
                f"of which only {len(up)} are up, not a majority; bring members back first")

    def _hand_over(self) -> Future[Table]:
        """Rule 7: the leader asked to remove itself transfers its leadership first."""
        self._refuse_unless_free()
        self.table.without(self.self_address)  # refuses removing the last voter
        candidates = [a for a in self.table.voters - {self.self_address} if self.healthy(a)]
        if not candidates:
            raise ChangeRefused("the leader cannot hand over: no other voter is up")
        self._require_quorum(self.table, self.table.without(self.self_address))
        target = max(candidates, key=lambda a: (self._match(a), a))
        future: Future[Table] = Future()
        self._transfer = _Transfer(self._internals.transport_nodes()[target],
                                   time.monotonic() + TRANSFER_TIMEOUT, future)
        self._hold(True)
        self._counters["membership_leader_handovers"] += 1
        log.info("asked to remove myself: handing leadership over to %s", target)
        return future

    def _step_transfer(self) -> None:
        transfer = self._transfer
        assert transfer is not None
        syncobj = self._syncobj
        done: NotApplied | None = None
        if not syncobj._isLeader():
            done = NotApplied("LEADERSHIP_TRANSFERRED", f"this node handed its leadership to "
                              f"{transfer.target.address}: remove it there")
        elif time.monotonic() > transfer.deadline:
            done = NotApplied("TRANSFER_FAILED", "the leader could not hand over in time; retry")
        elif not transfer.sent and self._match(transfer.target.address) == self._match(
                self.self_address):
            syncobj.transferLeadership(transfer.target)
            transfer.sent = True
        if done is not None:
            self._transfer = None
            self._hold(False)
            transfer.future.set_exception(done)

    # -- views (tick thread) ----------------------------------------------------------------------

    def views(self) -> list[MemberView]:
        syncobj = self._syncobj
        leading = bool(syncobj._isLeader())
        leader = syncobj._getLeader()
        leader_address = leader.address if leader is not None else None
        nodes = self._internals.transport_nodes()
        result = []
        for member in self.table.members:
            address = member.raft_address
            is_self = address == self.self_address
            node = nodes.get(address)
            connected = is_self or (node is not None and bool(syncobj.isNodeConnected(node)))
            result.append(MemberView(
                info=member, is_self=is_self, is_leader=address == leader_address,
                match_index=self._match(address) if leading or is_self else 0,
                connected=connected,
                in_sync=leading and member.role is Role.LEARNER and self.in_sync(address)))
        return result


def install(syncobj: SyncObj, internals: Internals, counters: Counter[str], *, self_address: str,
            bootstrap: Table, dial_via: Mapping[str, str], hold: Hold,
            on_fatal: Callable[[str], None]) -> Membership:
    return Membership(syncobj, internals, counters, self_address=self_address,
                      bootstrap=bootstrap, dial_via=dial_via, hold=hold, on_fatal=on_fatal)
