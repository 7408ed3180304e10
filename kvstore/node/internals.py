"""Every access to PySyncObj's private state, in one place, checked at start-up.

The node layer needs a few name-mangled attributes of ``SyncObj`` (the log, the command queue,
the leader's next/match indexes, the transport, the next-append timer). They exist in 0.3.17,
which we pin; if a different version is installed this fails loudly at start instead of
misbehaving later.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pysyncobj import SyncObj


class Internals:
    NEEDED = ("_SyncObj__raftLog", "_SyncObj__commandsQueue", "_SyncObj__raftMatchIndex",
              "_SyncObj__raftNextIndex", "_SyncObj__transport", "_SyncObj__newAppendEntriesTime")

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

    def force_append(self) -> None:
        """Makes the next tick send append_entries instead of waiting for the period."""
        self._syncobj._SyncObj__newAppendEntriesTime = 0.0
