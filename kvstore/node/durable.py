"""The durable mode (the default; ``--no-fsync`` turns it off): a node's copy of an entry counts
only once it is on disk (PySyncObj defect D3: it never fsyncs its journal).

Raft counts an entry as committed once a majority *stores* it. Written but not synced, "stored"
means "survives a process crash", not a power loss. Here a copy counts only once it is on disk:

* a follower's acknowledgement (``next_node_idx``) leaves only once the entries it claims are
  synced: the leader counts only durable follower copies. While the disk is quick the follower
  syncs on its tick thread, right before the acknowledgement leaves
  (``kvstore.node.quick_disk``); otherwise the sync runs on a thread of its own
  (``kvstore.node.sync_thread``), which holds the acknowledgement until then, so a slow disk
  does not stop the follower's tick loop (it still reads the leader's heartbeats);
* the leader's own copy counts toward a commit only once it is synced. Its sync runs on the
  same thread, requested at the end of the tick that appended the entries, so it overlaps the
  followers' (Raft thesis 10.2.1: a leader may write its log in parallel with replication) and
  the tick loop does not wait for the disk (behind a dump being written, the leader's
  ``fdatasync`` on its tick thread took 95-130 ms, issue 9). PySyncObj's commit step counts the
  leader as holding every entry it has appended, so its result is lowered, before anything reads
  it, to what a majority holds durably: entries the leader has synced, or that enough followers
  have acknowledged without it (``fenced_commit``); in the pass in which a leader steps down
  after its commit step (PySyncObj's leader fallback comes between that step and the apply),
  too. ``commit_before_flush`` counts a commit
  index past that at the end of a tick (the tests assert it stays zero).

One sync covers everything appended since the last one, so group commit amortises it: one
``fdatasync`` per batch per node, not per write. A cluster of one node commits its entries as
soon as it ticks, so it syncs on its tick thread, before that tick too (``RaftNode``). Term and vote
are durable in either mode: the journal stores them synchronously (``kvstore.node.meta_file``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from pysyncobj import SyncObj

from kvstore.node.internals import Internals
from kvstore.node.journal import Journal
from kvstore.node.sync_thread import SyncThread


def fenced_commit(commit: int, floor: int, synced: int, follower_matches: list[int],
                  term_of: Callable[[int], int | None], term: int) -> int:
    """The commit index a leader may have, given PySyncObj's ``commit`` (which counted the
    leader's copy of everything it appended): an entry past ``synced`` counts only if a majority
    of the voters hold it without the leader (``follower_matches``: each other voter's match
    index), and Raft commits by counting only an entry of the leader's ``term``. ``floor`` is a
    commit index already reached, never undone."""
    if commit <= synced:
        return commit
    majority = (len(follower_matches) + 1) // 2 + 1
    ranked = sorted(follower_matches, reverse=True)
    held = ranked[majority - 1] if majority <= len(ranked) else 0
    allowed = min(commit, max(synced, held))
    if allowed <= floor or term_of(allowed) != term:
        return min(commit, floor)
    return allowed


def install(syncobj: SyncObj, internals: Internals, counters: Counter[str], *,
            alone: bool, wake: Callable[[], None],
            disk_busy: Callable[[], bool] | None) -> tuple[Callable[[], None], SyncThread]:
    """Wraps the transport and the apply step; returns the hook to run at the end of every
    tick, just before it waits for messages, and the sync thread (to stop). ``alone``: a cluster
    of one node; ``wake``: makes the tick thread's wait return (the sync thread calls it when
    done); ``disk_busy``: whether the node writes a snapshot now (None: a follower never syncs
    on its tick thread, ``kvstore.node.quick_disk``)."""
    journal: Journal = internals.raft_log
    syncer = SyncThread(journal, internals.transport.send, wake, counters, disk_busy=disk_busy)
    internals.transport.send = syncer.send
    reached = [syncobj.raftCommitIndex]
    """The commit index as the last apply step found it, fenced: one that is committed."""

    def durable_commit() -> int:
        # Every voter has a match index on a leader (PySyncObj's commit step reads it so too).
        commit = syncobj.raftCommitIndex
        return fenced_commit(commit, min(reached[0], commit), journal.synced_index,
                             [internals.match_index[n] for n in internals.voters()],
                             internals.term_of, syncobj.raftCurrentTerm)

    led = [False]
    """Whether the node led at the last apply step."""

    def apply_fenced(apply: Callable[[], bool]) -> bool:
        # Runs right after the leader's commit step, before anything reads its result; also in
        # the pass in which the node stopped leading after that step (PySyncObj's leader
        # fallback runs between the two), whose commit index the leader's step still counted.
        leading = syncobj._isLeader()
        if not alone and (leading or led[0]):
            allowed = durable_commit()
            if allowed < syncobj.raftCommitIndex:
                internals.set_commit_index(allowed)
        led[0] = leading
        reached[0] = syncobj.raftCommitIndex
        return apply()

    internals.wrap_apply(apply_fenced)

    def before_waiting() -> None:
        if alone:
            # A lone leader commits as soon as it ticks, counting its own copy only.
            if journal.dirty:
                journal.sync()
                counters["journal_fsyncs"] += 1
        else:
            if syncobj._isLeader() and syncobj.raftCommitIndex > durable_commit():
                counters["commit_before_flush"] += 1
            syncer.request()
        syncer.release()

    return before_waiting, syncer
