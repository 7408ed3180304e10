"""The durable mode (``--fsync``): a node makes its journal durable before it tells anyone
about the entries in it (PySyncObj defect D3: it never fsyncs its journal).

Raft counts an entry as committed once a majority *stores* it; PySyncObj's journal is an mmap
that is written to the page cache and never flushed, so "stored" means "survives a process
crash", not a power loss. Here every message that vouches for journal entries waits for them to
reach the disk first:

* ``append_entries`` (the leader shipping entries): the leader's own copy is durable before any
  follower can acknowledge, so the majority that commits always includes a durable leader copy;
* ``next_node_idx`` (a follower acknowledging): the follower's copy is durable before the leader
  counts it.

One flush covers everything appended since the last one, so group commit amortises it: one
``msync`` + ``fsync`` per batch per node, not per write. Term and vote are stored by PySyncObj
synchronously (``setCurrentTerm``); the mode fsyncs that file as well.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from kvstore.node.internals import Internals

VOUCHING_MESSAGES = frozenset({"append_entries", "next_node_idx"})


def install(internals: Internals, counters: Counter[str]) -> Callable[[], None]:
    """Wraps the journal and the transport; returns a function that flushes if anything is
    unflushed (the tick loop calls it too, for a cluster of one, which sends nothing)."""
    journal = internals.raft_log
    journal_file = journal._FileJournal__journalFile  # ResizableFile: an mmap over a file
    meta_path = journal._FileJournal__metaStorer.getPath()
    dirty = [False]

    def flush() -> None:
        journal_file._ResizableFile__mm.flush()  # msync: the mapped pages reach the disk
        os.fsync(journal_file._ResizableFile__f.fileno())  # and the file's size with them
        dirty[0] = False
        counters["journal_fsyncs"] += 1

    def marking(method: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            dirty[0] = True
            return method(*args, **kwargs)
        return wrapped

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
        if dirty[0] and type(message) is dict and message.get("type") in VOUCHING_MESSAGES:
            flush()
        return original_send(node, message)

    internals.transport.send = send

    def flush_if_dirty() -> None:
        if dirty[0]:
            flush()

    return flush_if_dirty
