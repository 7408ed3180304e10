"""A node's view of itself, and alarms for a replica that is stuck or falling behind.

Each alarm is a condition that has held continuously for ``ALARM_AFTER`` seconds, so a blip
(one slow tick, a peer reconnecting) does not raise one. Conditions are sampled on the tick
thread; a tick thread that stops answering is itself reported (``tick_thread_unresponsive``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvstore.node.membership import MemberView
from kvstore.node.raft_node import RaftNode

ALARM_AFTER = 5.0
"""Seconds a condition must hold before it is reported."""
APPLY_LAG_ALARM = 1000
"""Committed but unapplied entries above which the apply loop is "far behind"."""
PEER_LAG_ALARM = 1000
"""Entries a follower may lag the leader's log before the leader reports it."""
SAMPLE_EVERY = 0.1

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


class Health:
    """Samples alarm conditions on every tick and reports the ones that persisted."""

    def __init__(self, node: RaftNode) -> None:
        self._node = node
        self._since: dict[str, float] = {}
        self._last_sample = 0.0
        self._applied_seen = (0, time.monotonic())
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
