"""``KVNode``: the key-value state machine on a Raft replica, as the API server sees it."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, BinaryIO

from kvstore.config import Member, NodeConfig
from kvstore.node import dump_file, gap_causes, gc_pauses
from kvstore.node.health import Health, NodeStatusView, raft_view
from kvstore.node.member_table import MemberInfo, Role, Table, bootstrap
from kvstore.node.membership import Membership, MemberView
from kvstore.node.outcomes import LoopWaiter, NotApplied, OutcomeUnknown, ProposeError, outcome
from kvstore.node.raft_node import RaftNode, RaftOptions
from kvstore.node.snapshotter import digest_of
from kvstore.proto.log_pb2 import Command, Result
from kvstore.snapshot import Frozen
from kvstore.state_machine import StateMachine

if TYPE_CHECKING:
    from kvstore.metrics import NodeMetrics

TICK_TASK_TIMEOUT = 2.0
"""How long a read or a status waits for the tick thread before calling it unresponsive."""


class KVNode:
    def __init__(self, config: NodeConfig,
                 state_machine_type: type[StateMachine] = StateMachine) -> None:
        self.config = config
        self.state_machine = state_machine_type(config.cluster_id, config.session_capacity)
        self.metrics: NodeMetrics | None = None
        """The counts behind ``--metrics`` (``kvstore.metrics``); ``None`` without it."""
        replicated = self.state_machine
        if config.metrics_address is not None:
            from kvstore.metrics import NodeMetrics  # prometheus_client: only if asked for

            self.metrics = NodeMetrics()
            replicated = self.metrics.observing(self.state_machine)  # type: ignore[assignment]
        self.raft = RaftNode(
            replicated,
            RaftOptions(
                background_snapshots=config.background_snapshots,
                self_address=config.me.raft_address,
                peers=tuple(peer.raft_address for peer in config.peers),
                data_dir=str(config.data_dir),
                password=config.secret,
                log_compaction_min_entries=config.snapshot_count,
                dial_via=config.dial_via,
                fsync=config.fsync,
                members=bootstrap_table(config),
            ),
        )
        self.health = Health(self.raft)
        self.gc_pauses = gc_pauses.install()
        journal = self.raft.journal

        def causes() -> gap_causes.Causes:  # on the tick thread, which owns the journal
            made = gap_causes.Causes(lambda: self.gc_pauses.seconds, lambda: journal.io_seconds)
            journal.io_clock = made.wall_less_runq
            return made
        self.health.tick_gaps.causes = causes
        self._digest_cache: tuple[tuple[int, int], str] | None = None
        if self.metrics is not None:
            self.raft.add_tick_hook(self.metrics.leader_watch(self.raft))

    def propose(self, entry: bytes, timeout: float) -> bytes:
        return self.raft.propose(entry, timeout)

    async def propose_async(self, entry: bytes, timeout: float) -> bytes:
        return await self.raft.propose_async(entry, timeout)

    async def propose_many_async(self, entries: list[bytes],
                                 timeout: float) -> list[bytes | ProposeError]:
        """Proposes ``entries`` in one submission (they share the next replicated batch) and
        returns, in order, each one's result or the ``NotApplied``/``OutcomeUnknown`` that says
        what became of it. Those still unanswered at ``timeout`` are ``OutcomeUnknown``
        (``TIMEOUT``): PySyncObj cannot take an entry back. Raises ``NotApplied`` if the node
        refuses them all at once (it failed)."""
        if not entries:
            return []
        loop = asyncio.get_running_loop()
        waiters = [LoopWaiter(loop) for _ in entries]
        self.raft.submit_many(entries, list(waiters))
        await asyncio.wait([w.future for w in waiters], timeout=timeout)
        answers: list[bytes | ProposeError] = []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.cancel()  # a late outcome is dropped (LoopWaiter.settle)
                answers.append(OutcomeUnknown("TIMEOUT", f"no outcome within {timeout:.3f}s"))
                continue
            try:
                answers.append(outcome(*waiter.future.result()))
            except ProposeError as exc:
                answers.append(exc)
        return answers

    def is_leader(self) -> bool:
        return self.raft.is_leader()

    def leader_address(self) -> str | None:
        return self.raft.leader_address()

    # -- membership (kvstore.node.membership) --------------------------------------------------

    @property
    def membership(self) -> Membership:
        assert self.raft.membership is not None
        return self.raft.membership

    @property
    def removed(self) -> bool:
        """This node was removed from the cluster: it must not serve clients any more."""
        return self.membership.removed

    def api_address_of(self, raft_address: str) -> str:
        """A member's client API address, from the member table in effect ('' if unknown)."""
        return self.membership.api_address_of(raft_address) or \
            self.config.api_address_of(raft_address)

    def members(self) -> tuple[Table, list[MemberView], int, bool]:
        """(table, views, commit index, change pending), taken together on the tick thread."""
        ms, raft = self.membership, self.raft
        return raft.on_tick_thread(
            lambda: (ms.table, ms.views(), raft.raftCommitIndex, ms.change_pending()),
            TICK_TASK_TIMEOUT)

    def change_membership(self, kind: str, raft_address: str, name: str = "",
                          api_address: str = "") -> Future[Table]:
        """Appends one membership change on the leader (on the tick thread); the future is
        resolved when it commits. Raises ``NotApplied`` or ``ChangeRefused`` at once."""
        ms = self.membership
        changes = {"add": lambda: ms.add_learner(name, raft_address, api_address),
                   "promote": lambda: ms.promote(raft_address),
                   "remove": lambda: ms.remove(raft_address)}
        return self.raft.on_tick_thread(changes[kind], TICK_TASK_TIMEOUT)

    def read_local(self, command: Command) -> Result:
        """A serializable read of this replica, taken between two applies. Refused
        (``NotApplied``) while a snapshot is being restored: the state is older than the
        applied index says, possibly empty."""
        def read() -> Result:
            if self.raft.restoring:
                raise NotApplied("RESTORING", "this node is restoring a snapshot")
            return self.state_machine.query(command)
        return self.raft.on_tick_thread(read, TICK_TASK_TIMEOUT)

    def status(self, *, with_digest: bool = False) -> NodeStatusView:
        """This node's view, taken on the tick thread so that its numbers agree with each other.

        The digest hashes the whole state (seconds at millions of keys): the tick thread only
        freezes a copy of it, and the hashing happens here, on the caller's thread. While a
        snapshot is being restored there is no digest (the state is not yet at the applied
        index). The last digest is kept until the state changes."""
        try:
            view, frozen = self.raft.on_tick_thread(lambda: self._view(with_digest),
                                                    TICK_TASK_TIMEOUT)
        except TimeoutError:
            view, _ = self._view(with_digest=False)  # racy, but better than nothing
            view.alarms.append("tick_thread_unresponsive")
            return view
        if with_digest and "restoring" not in view.snapshot:
            if frozen is not None:
                gate = self.raft.snapshotter.gate
                self._digest_cache = (self._digest_key(view), digest_of(frozen, gate))
            view.digest = self._digest_cache[1] if self._digest_cache else ""
        return view

    def snapshot_index(self) -> int:
        """The index a backup asked for now must cover: the leader's commit index. A follower
        refuses (``NotApplied``): its snapshot may lag the cluster's."""
        def leader_commit() -> int | None:
            return self.raft.raftCommitIndex if self.raft.is_leader() else None

        index = self.raft.on_tick_thread(leader_commit, TICK_TASK_TIMEOUT)
        if index is None:
            raise NotApplied("NOT_LEADER", "backups come from the leader")
        return index

    def open_snapshot(self, index: int) -> BinaryIO | None:
        """The node's own snapshot file, open at its start, if it covers ``index``; else asks
        the node to take one now (PySyncObj's ``forceLogCompaction``, done on a coming tick)
        and returns ``None``: poll again.

        A backup reuses the node's snapshot, the file a leader streams to a follower that fell
        behind, rather than serializing the state itself. The open file stays the same even
        when PySyncObj replaces the path with a newer one meanwhile.
        """
        try:
            f: BinaryIO | None = open(self.raft.dump_path, "rb")
        except FileNotFoundError:
            f = None
        if f is not None:
            try:
                covered = dump_file.read_meta(f)["last"][1] >= index
            except (dump_file.DumpCorrupt, ValueError, KeyError, IndexError):
                covered = False
            if covered:
                f.seek(0)
                return f
            f.close()
        self.raft.forceLogCompaction()
        return None

    def stop(self) -> None:
        self.raft.stop()

    def _view(self, with_digest: bool) -> tuple[NodeStatusView, Frozen | None]:
        sm, raft, ms = self.state_machine, self.raft, self.membership
        counters, snapshotter = raft.counters, raft.snapshotter
        gaps = self.health.tick_gaps.figures()
        view = NodeStatusView(
            **raft_view(raft),  # type: ignore[arg-type]
            sessions=len(sm.sessions),
            keys=len(sm.data),
            digest="",
            alarms=self.health.alarms(),
            members=ms.views(),
            membership_change_pending=ms.change_pending(),
            snapshot=raft.snapshot_activity,
            tick_gap_max=gaps.since_start,
            tick_gap_recent=gaps.recent,
            snapshots_written=counters["snapshots_written"],
            snapshots_loaded=counters["snapshots_loaded"],
            snapshot_write_seconds=snapshotter.last_write_seconds,
            snapshot_restore_seconds=snapshotter.last_restore_seconds,
            gc_pause_max=self.gc_pauses.longest_pause(),
        )
        role = ms.self_role
        if role != Role.VOTER.value:
            view.role = role  # learner, removed, joining or none: never leader nor candidate
        if ms.removed:
            view.alarms.append(f"removed: this node was removed from the cluster "
                               f"('{ms.table.change}'); it serves no client")
        cached = self._digest_cache
        fresh = cached is not None and cached[0] == self._digest_key(view)
        return view, sm.freeze() if with_digest and not raft.restoring and not fresh else None

    @staticmethod
    def _digest_key(view: NodeStatusView) -> tuple[int, int]:
        """The same applied index and the same restores: the same state, the same digest."""
        return view.applied_index, view.snapshots_loaded


def bootstrap_table(config: NodeConfig) -> Table:
    """The members on the command line: the initial cluster, or the ones a joiner contacts."""
    def info(member: Member) -> MemberInfo:
        return MemberInfo(member.name, member.raft_address, member.api_address, Role.VOTER)

    me = None if config.join else info(Member(config.me.raft_address, config.me.api_address,
                                              config.node_id))
    return bootstrap(me, [info(peer) for peer in config.peers])
