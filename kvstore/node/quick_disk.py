"""When a follower syncs its journal on its own tick thread: only while the disk is quick.

The rule, which is about time, not safety (either way an acknowledgement leaves only once the
entries it claims are on disk, ``kvstore.node.sync_thread``): the tick thread makes the sync an
acknowledgement waits for itself only if

* nothing else of this node is writing to the disk: no snapshot being written or received, and
  the sync thread idle (no sync, meta store, compaction step or directory sync asked for or
  running), and
* its last sync on the tick thread took at most ``QUICK_SYNC``. After a slower one, syncs go to
  the sync thread for ``SLOW_DISK_BACKOFF``, then the tick thread tries again.

Why on the tick thread at all: on the sync thread, the sync an acknowledgement waits for costs
a follower's turn (an append in, an acknowledgement out) a lock hand-off to that thread, its
wait for the interpreter lock the tick thread holds, a pipe wake-up and a whole pass of the
tick loop back before the acknowledgement leaves. ``benchmarks/write_stages.py`` measured that
turn at 0.9-1.3 ms with the sync thread and 0.6-0.7 ms inline (fdatasync itself: 0.16 ms).

Why not always: an ``fdatasync`` waits behind whatever else the disk is writing back. Behind a
snapshot of a hundred MiB it took up to a second (issue 9): on the tick thread, that stops the
whole loop (no heartbeat read, and the follower's election timer runs out). Such a wait is
foreseeable when this node is writing a snapshot (never inline then) and likely to repeat once
seen (the back-off); what is left is one slow sync after the disk turns slow for a reason of
its own, the risk etcd takes on every sync of its WAL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

QUICK_SYNC = 0.010
"""Seconds: a sync on the tick thread that took longer says the disk is slow now."""
SLOW_DISK_BACKOFF = 2.0
"""Seconds during which syncs stay on the sync thread after a slow one."""


class QuickDisk:
    """Remembers whether the disk was quick lately (tick thread only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slow_until = float("-inf")
        self.slow_syncs = 0
        """Syncs on the tick thread that took longer than ``QUICK_SYNC``."""

    def quick(self) -> bool:
        """No slow sync within the last ``SLOW_DISK_BACKOFF``."""
        return self._clock() >= self._slow_until

    def timed(self, sync: Callable[[], None]) -> None:
        """Runs ``sync`` and remembers whether it was quick."""
        started = self._clock()
        sync()
        finished = self._clock()
        if finished - started > QUICK_SYNC:
            self.slow_syncs += 1
            self._slow_until = finished + SLOW_DISK_BACKOFF
