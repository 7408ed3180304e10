"""A node's view of itself, and alarms for a replica that is stuck or falling behind.

Each alarm is a condition that has held continuously for ``ALARM_AFTER`` seconds, so a blip
(one slow tick, a peer reconnecting) does not raise one. Conditions are sampled on the tick
thread; a tick thread that stops answering is itself reported (``tick_thread_unresponsive``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.node import gap_causes
from kvstore.node.membership import MemberView
from kvstore.node.raft_node import RaftNode

log = logging.getLogger("kvstore.node.health")

ALARM_AFTER = 5.0
"""Seconds a condition must hold before it is reported."""
APPLY_LAG_ALARM = 1000
"""Committed but unapplied entries above which the apply loop is "far behind"."""
PEER_LAG_ALARM = 1000
"""Entries a follower may lag the leader's log before the leader reports it."""
SAMPLE_EVERY = 0.1
LONG_TICK_GAP = 0.1
"""A gap between two passes of the tick loop that is logged (the budget of issue 9)."""
RECENT_SECONDS = 10
"""The window of the "recent" longest tick gap."""

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}


@dataclass
class NodeStatusView:
    role: str
    leader: str | None
    term: int
    commit_index: int
    applied_index: int
    has_quorum: bool
    log_length: int
    sessions: int
    keys: int
    digest: str
    peers_connected: dict[str, bool] = field(default_factory=dict)
    peers_match_index: dict[str, int] = field(default_factory=dict)
    alarms: list[str] = field(default_factory=list)
    members: list[MemberView] = field(default_factory=list)
    membership_change_pending: bool = False
    snapshot: list[str] = field(default_factory=list)
    """Snapshot work in progress: writing, sending:<peer>, receiving, restoring."""
    tick_gap_max: float = 0.0
    """Longest time between two passes of the tick loop since the node started, in seconds."""
    tick_gap_recent: float = 0.0
    """The same over the last ``RECENT_SECONDS``."""
    snapshots_written: int = 0
    snapshots_loaded: int = 0
    snapshot_write_seconds: float = 0.0
    """How long the last snapshot took to write (freeze to rename), and the last restore."""
    snapshot_restore_seconds: float = 0.0
    gc_pause_max: float = 0.0
    """The longest collection of the garbage collector since start (``kvstore.node.gc_pauses``)."""


@dataclass(frozen=True)
class GapFigures:
    """The longest tick gaps, in seconds, as of one moment."""

    recent: float
    since_start: float


class TickGaps:
    """The longest gap between two passes of the tick loop, since start and recently.

    A pass that does not come is a node that sends no heartbeat, answers no vote and applies
    nothing: the figure that says whether anything (a snapshot, a large batch) stalls the node.
    Kept per second in a ring, so "recent" costs nothing to maintain.
    """

    def __init__(self) -> None:
        self._last: float | None = None
        self.longest = 0.0
        self._ring: list[tuple[int, float]] = [(-1, 0.0)] * RECENT_SECONDS
        self.causes: Callable[[], gap_causes.Causes] | None = None
        """Makes the clocks of ``kvstore.node.gap_causes`` on the tick thread, at its first pass."""
        self._causes: gap_causes.Causes | None = None
        self._probed: tuple[float, ...] = ()

    def on_tick(self) -> None:
        now = time.monotonic()
        if self._causes is None and self.causes is not None:
            self._causes = self.causes()
        probed = self._causes.probe() if self._causes is not None else ()
        if self._last is not None:
            gap = now - self._last
            if gap > LONG_TICK_GAP:
                log.warning("the tick thread made no pass for %.0f ms (%s)", gap * 1e3,
                            gap_causes.explain(self._causes.names if self._causes else (),
                                               self._probed, probed))
            self.longest = max(self.longest, gap)
            second = int(now)
            slot = second % RECENT_SECONDS
            seen, worst = self._ring[slot]
            if seen != second:
                self._ring[slot] = (second, gap)
            elif gap > worst:
                self._ring[slot] = (second, gap)
        self._last = now
        self._probed = probed

    def figures(self) -> GapFigures:
        """The longest gap since start and in the last ``RECENT_SECONDS``, one still open
        counted in both.

        One clock reading serves both figures, so the recent one can never exceed the one
        since start (two readings would each count a different length of the open gap).
        """
        now = time.monotonic()
        open_gap = now - self._last if self._last is not None else 0.0
        oldest = int(now) - RECENT_SECONDS
        closed = max((gap for second, gap in self._ring if second > oldest), default=0.0)
        return GapFigures(recent=max(closed, open_gap), since_start=max(self.longest, open_gap))


class Health:
    """Samples alarm conditions on every tick and reports the ones that persisted."""

    def __init__(self, node: RaftNode) -> None:
        self._node = node
        self._since: dict[str, float] = {}
        self._last_sample = 0.0
        self._applied_seen = (0, time.monotonic())
        self.tick_gaps = TickGaps()
        node.add_tick_hook(self.tick_gaps.on_tick)
        node.add_tick_hook(self._on_tick)

    def alarms(self) -> list[str]:
        now = time.monotonic()
        held = sorted(k for k, t0 in self._since.items() if now - t0 >= ALARM_AFTER)
        if self._node.fatal:
            held.append(f"fatal: {self._node.fatal}")
        return held

    def _on_tick(self) -> None:
        now = time.monotonic()
        if now - self._last_sample < SAMPLE_EVERY:
            return
        self._last_sample = now
        node = self._node
        conditions: set[str] = set()
        applied, commit = node.raftLastApplied, node.raftCommitIndex
        if commit - applied > APPLY_LAG_ALARM:
            conditions.add("apply_far_behind")
        if applied != self._applied_seen[0]:
            self._applied_seen = (applied, now)
        elif commit > applied and now - self._applied_seen[1] >= ALARM_AFTER:
            conditions.add("apply_stalled")
        if node.leader_address() is None:
            conditions.add("no_leader")
        if node.is_leader():
            last = node.internals.raft_log[-1][1]
            for peer, match in list(node.internals.match_index.items()):
                if last - match > PEER_LAG_ALARM:
                    conditions.add(f"peer_lagging:{peer.address}")
            for peer in node.otherNodes:
                if not node.isNodeConnected(peer):
                    conditions.add(f"peer_disconnected:{peer.address}")
        for key in [k for k in self._since if k not in conditions]:
            del self._since[key]
        for key in conditions:
            self._since.setdefault(key, now)


def raft_view(node: RaftNode) -> dict[str, object]:
    """The Raft part of the status, from PySyncObj's ``getStatus()``."""
    status = node.getStatus()
    is_leader = status["state"] == 2
    leader = status["leader"]
    connected, match = {}, {}
    for peer in node.otherNodes | node.internals.receivers():  # voters, then learners
        connected[peer.address] = node.isNodeConnected(peer)
        # PySyncObj never clears match indexes when a leader steps down: only a leader's are real.
        if is_leader:
            match[peer.address] = status.get(f"match_idx_server_{peer.id}", 0)
    return {
        "role": _ROLES.get(status["state"], str(status["state"])),
        "leader": leader.address if leader is not None else None,
        "term": status["raft_term"],
        "commit_index": status["commit_idx"],
        "applied_index": status["last_applied"],
        "has_quorum": bool(status["has_quorum"]),
        "log_length": status["log_len"],
        "peers_connected": connected,
        "peers_match_index": match,
    }
