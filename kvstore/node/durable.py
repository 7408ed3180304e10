"""The durable mode (the default; ``--no-fsync`` turns it off): a node's copy of an entry counts
only once it is on disk (PySyncObj defect D3: it never fsyncs its journal).

Raft counts an entry as committed once a majority *stores* it. Written but not synced, "stored"
means "survives a process crash", not a power loss. Here a copy counts only once it is on disk:

* a follower's acknowledgement (``next_node_idx``) leaves only once the entries it claims are
  synced: the leader counts only durable follower copies. The sync runs on a thread of its own
  (``kvstore.node.sync_thread``), which holds the acknowledgement until then, so a slow disk
  does not stop the follower's tick loop (it still reads the leader's heartbeats);
* the leader syncs at the end of the tick that sent the entries, just before it waits for
  answers. Its own fsync thus runs while the followers receive and sync theirs (Raft thesis
  10.2.1: a leader may write its log in parallel with replication), yet it is done before any
  acknowledgement is read, so before the commit that counts the leader's copy (PySyncObj counts
  the leader at the start of the next tick). ``commit_before_flush`` counts violations of this
  order; the tests assert it stays zero.

One sync covers everything appended since the last one, so group commit amortises it: one
``fdatasync`` per batch per node, not per write. A cluster of one node commits its entries as
soon as it ticks, so it runs the same hook before that tick too (``RaftNode``). Term and vote
are durable in either mode: the journal stores them synchronously (``kvstore.node.meta_file``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from pysyncobj import SyncObj

from kvstore.node.internals import Internals
from kvstore.node.journal import Journal
from kvstore.node.sync_thread import SyncThread


def install(syncobj: SyncObj, internals: Internals, counters: Counter[str], *,
            alone: bool, wake: Callable[[], None]) -> tuple[Callable[[], None], SyncThread]:
    """Wraps the transport; returns the hook to run at the end of every tick, just before it
    waits for messages, and the sync thread (to stop). ``alone``: a cluster of one node;
    ``wake``: makes the tick thread's wait return (the sync thread calls it when done)."""
    journal: Journal = internals.raft_log
    syncer = SyncThread(journal, internals.transport.send, wake, counters)
    internals.transport.send = syncer.send

    def before_waiting() -> None:
        if alone or syncobj._isLeader():
            # The commit computed at this tick's start counted the leader's copy: it must be
            # durable.
            if not alone and syncobj.raftCommitIndex > journal.synced_index:
                counters["commit_before_flush"] += 1
            if journal.dirty:
                journal.sync()
                counters["journal_fsyncs"] += 1
        else:
            syncer.request()
        syncer.release()

    return before_waiting, syncer
