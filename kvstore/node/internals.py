"""Every access to PySyncObj's private state, in one place, checked at start-up.

The node layer needs a few name-mangled attributes of ``SyncObj`` (the log, the command queue,
the leader's next/match indexes, the transport, the next-append timer, and for membership the
voter and receiver sets). They exist in 0.3.17, which we pin; if a different version is
installed this fails loudly at start instead of misbehaving later.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from pysyncobj import SyncObj
from pysyncobj.node import TCPNode
from pysyncobj.tcp_connection import TcpConnection


class Internals:
    NEEDED = ("_SyncObj__raftLog", "_SyncObj__commandsQueue", "_SyncObj__raftMatchIndex",
              "_SyncObj__raftNextIndex", "_SyncObj__transport", "_SyncObj__newAppendEntriesTime",
              "_SyncObj__otherNodes", "_SyncObj__readonlyNodes", "_SyncObj__connectedNodes",
              "_SyncObj__lastResponseTime", "_SyncObj__raftElectionDeadline",
              "_SyncObj__generateRaftTimeout", "_SyncObj__noopIDx",
              "_SyncObj__serializer", "_SyncObj__applyLogEntries", "_SyncObj__sendAppendEntries",
              "_SyncObj__raftCommitIndex", "_SyncObj__leaderCommitIndex")

    def __init__(self, syncobj: SyncObj) -> None:
        missing = [name for name in self.NEEDED if not hasattr(syncobj, name)]
        if missing:
            raise RuntimeError(f"PySyncObj internals changed (0.3.17 needed): missing {missing}")
        self._syncobj = syncobj
        self.raft_log: Any = syncobj._SyncObj__raftLog
        self.queue: deque[Any] = syncobj._SyncObj__commandsQueue._FastQueue__queue
        self.match_index: dict[Any, int] = syncobj._SyncObj__raftMatchIndex
        self.next_index: dict[Any, int] = syncobj._SyncObj__raftNextIndex
        self.transport: Any = syncobj._SyncObj__transport
        self.last_response_time: dict[Any, float] = syncobj._SyncObj__lastResponseTime

    def voters(self) -> set[TCPNode]:
        """The other voters, whose copies count toward a commit (``otherNodes``)."""
        return self._syncobj._SyncObj__otherNodes  # type: ignore[no-any-return]

    def term_of(self, index: int) -> int | None:
        """The term of the entry at ``index`` in the log, None if the log does not hold it."""
        log = self.raft_log
        if not len(log) or not log[0][1] <= index <= log[-1][1]:
            return None
        return log[index - log[0][1]][2]  # type: ignore[no-any-return]

    def set_commit_index(self, index: int) -> None:
        """Sets the leader's commit index (``kvstore.node.durable`` lowers it to what is durable)
        where PySyncObj's commit step leaves it: the index, the leader's copy, the journal's."""
        self._syncobj._SyncObj__raftCommitIndex = index
        self._syncobj._SyncObj__leaderCommitIndex = index
        self.raft_log.setRaftCommitIndex(index)

    def force_append(self) -> None:
        """Makes the next tick send append_entries instead of waiting for the period."""
        self._syncobj._SyncObj__newAppendEntriesTime = 0.0

    # -- membership (kvstore.node.membership) ------------------------------------------------

    def transport_nodes(self) -> dict[str, TCPNode]:
        """The named peers the transport connects to and accepts, by address."""
        return {node.address: node for node in self.transport._nodes}

    def add_node(self, node: TCPNode) -> None:
        self.transport.addNode(node)

    def drop_node(self, node: TCPNode) -> None:
        """Forgets a peer: its connection, and the leader's bookkeeping of it. (PySyncObj's own
        removal leaves the node in ``__connectedNodes``: the transport pops the connection
        before closing it, so the disconnect callback no longer knows whose it was.)"""
        self.transport.dropNode(node)
        self._syncobj._SyncObj__connectedNodes.discard(node)
        self.next_index.pop(node, None)
        self.match_index.pop(node, None)
        self.last_response_time.pop(node, None)

    def set_members(self, voters: set[TCPNode], receivers: set[TCPNode]) -> None:
        """Voters count in elections and commits (``otherNodes``); receivers are sent the log
        and count for nothing (``readonlyNodes``, where PySyncObj also keeps anonymous
        read-only clients, which stay). Every node gets the bookkeeping PySyncObj's leader
        loop reads without a default."""
        syncobj = self._syncobj
        anonymous = {n for n in syncobj._SyncObj__readonlyNodes if not isinstance(n, TCPNode)}
        syncobj._SyncObj__otherNodes = set(voters)
        syncobj._SyncObj__readonlyNodes = set(receivers) | anonymous
        # Empty while a snapshot replaces the log (cleared, then refilled): the leader's next
        # indexes are reset when it becomes leader anyway.
        next_index = self.raft_log[-1][1] + 1 if len(self.raft_log) else 1
        now = time.monotonic()
        for node in voters | receivers:
            self.next_index.setdefault(node, next_index)
            self.match_index.setdefault(node, 0)
            self.last_response_time.setdefault(node, now)

    def receivers(self) -> set[TCPNode]:
        return {n for n in self._syncobj._SyncObj__readonlyNodes if isinstance(n, TCPNode)}

    def never_campaign(self) -> None:
        """Pushes the election deadline out of reach (a node that is not a voter)."""
        self._syncobj._SyncObj__raftElectionDeadline = math.inf

    def restart_election_timer(self) -> None:
        self._syncobj._SyncObj__raftElectionDeadline = (
            time.monotonic() + self._syncobj._SyncObj__generateRaftTimeout())

    def election_deadline(self) -> float:
        return float(self._syncobj._SyncObj__raftElectionDeadline)

    def leader_noop_index(self) -> int | None:
        """The index of the no-op this node appended when it last became leader."""
        return self._syncobj._SyncObj__noopIDx  # type: ignore[no-any-return]
    def use_serializer(self, serializer: Any) -> None:
        """Replaces PySyncObj's ``Serializer`` (the object that takes, sends, receives and loads
        dumps) with one of the same interface (``kvstore.node.snapshotter``)."""
        self._syncobj._SyncObj__serializer = serializer

    def wrap_apply(self, wrapper: Callable[[Callable[[], bool]], bool]) -> None:
        """Routes PySyncObj's apply step (``__applyLogEntries``, once per tick) through
        ``wrapper(original)``: an instance attribute wins over the class's method."""
        original = self._syncobj._SyncObj__applyLogEntries
        self._syncobj._SyncObj__applyLogEntries = lambda: wrapper(original)

    def on_each_connection(self, hook: Callable[[TcpConnection], object]) -> None:
        """Calls ``hook`` once for each peer connection of this node: those open or pending
        now, each new outgoing one (``addNode``), and each one the server accepts from now on
        (before its first message). Used by ``kvstore.node.lean_wire``."""
        transport, seen = self.transport, weakref.WeakSet[TcpConnection]()

        def once(conn: TcpConnection | None) -> None:
            if conn is not None and conn not in seen:
                seen.add(conn)
                hook(conn)

        for conn in [*transport._connections.values(), *transport._unknownConnections]:
            once(conn)
        add_node = transport.addNode

        def add_node_then_hook(node: TCPNode) -> None:
            add_node(node)
            once(transport._connections.get(node))

        transport.addNode = add_node_then_hook
        server = transport._server
        if server is not None:
            accepted = server._TcpServer__onNewConnectionCallback

            def hook_then_accept(conn: TcpConnection) -> None:
                once(conn)
                accepted(conn)

            server._TcpServer__onNewConnectionCallback = hook_then_accept

    def wrap_send(self, wrapper: Callable[[Callable[[], None]], None]) -> None:
        """The same for the leader's send step (``__sendAppendEntries``)."""
        original = self._syncobj._SyncObj__sendAppendEntries
        self._syncobj._SyncObj__sendAppendEntries = lambda: wrapper(original)
