"""The durable mode (``--fsync``): a node makes its journal durable before its copy of an entry
counts (PySyncObj defect D3: it never fsyncs its journal).

Raft counts an entry as committed once a majority *stores* it; PySyncObj's journal is an mmap
that is written to the page cache and never flushed, so "stored" means "survives a process
crash", not a power loss. Here a copy counts only once it is on disk:

* a follower flushes before ``next_node_idx`` (its acknowledgement): the leader counts only
  durable follower copies;
* the leader flushes at the end of the tick that sent the entries, just before it waits for
  answers. Its own fsync thus runs while the followers receive and flush theirs (Raft thesis
  10.2.1: a leader may write its log in parallel with replication), yet it is done before any
  acknowledgement is read, so before the commit that counts the leader's copy (PySyncObj counts
  the leader at the start of the next tick). ``commit_before_flush`` counts violations of this
  order; the tests assert it stays zero.

One flush covers everything appended since the last one, so group commit amortises it: one
``msync`` + ``fsync`` per batch per node, not per write. A cluster of one node commits before the
flush at the end of the same tick (there is nobody to wait for). Term and vote are stored by
PySyncObj synchronously (``setCurrentTerm``); the mode fsyncs that file as well.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from pysyncobj import SyncObj

from kvstore.node.internals import Internals

ACKNOWLEDGEMENT = "next_node_idx"


def install(syncobj: SyncObj, internals: Internals, counters: Counter[str], *,
            alone: bool) -> Callable[[], None]:
    """Wraps the journal and the transport; returns the hook to run at the end of every tick,
    just before it waits for messages. ``alone``: a cluster of one node."""
    journal = internals.raft_log
    journal_file = journal._FileJournal__journalFile  # ResizableFile: an mmap over a file
    meta_path = journal._FileJournal__metaStorer.getPath()
    dirty = [False]
    flushed_index = [0]

    def flush() -> None:
        journal_file._ResizableFile__mm.flush()  # msync: the mapped pages reach the disk
        os.fsync(journal_file._ResizableFile__f.fileno())  # and the file's size with them
        dirty[0] = False
        flushed_index[0] = journal[-1][1]
        counters["journal_fsyncs"] += 1

    def marking(method: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            dirty[0] = True
            return method(*args, **kwargs)
        return wrapped

    flush()  # what the journal held at start-up counts from now on

    for name in ("add", "clear", "deleteEntriesFrom"):
        setattr(journal, name, marking(getattr(journal, name)))

    original_set_term = journal.setCurrentTerm

    def set_current_term(term: int, voted_for: Any) -> None:
        original_set_term(term, voted_for)  # writes the meta file and renames it into place
        fd = os.open(meta_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(os.path.dirname(meta_path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    journal.setCurrentTerm = set_current_term

    original_send = internals.transport.send

    def send(node: Any, message: Any) -> Any:
        if dirty[0] and type(message) is dict and message.get("type") == ACKNOWLEDGEMENT:
            flush()
        return original_send(node, message)

    internals.transport.send = send

    def before_waiting() -> None:
        # The commit computed at this tick's start counted the leader's copy: it must be durable.
        if not alone and syncobj._isLeader() and syncobj.raftCommitIndex > flushed_index[0]:
            counters["commit_before_flush"] += 1
        if dirty[0]:
            flush()

    return before_waiting
