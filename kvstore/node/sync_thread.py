"""The journal's sync, off the tick thread: a follower's acknowledgement leaves only once the
entries it claims are on disk.

The rule it enforces: a success ``next_node_idx`` (a follower's acknowledgement, which the
leader counts toward a commit) that claims the entries up to N is sent only once
``Journal.synced_index >= N``, i.e. a ``fdatasync`` that started after those entries were
written has returned. Until then it is held here, and so is every message to be sent after it
(they leave in order). Messages that claim nothing (a refusal, a keepalive) go out at once when
nothing is held.

Why a thread: an ``fdatasync`` waits behind whatever else the disk is writing back (a snapshot
of a hundred MiB: up to a second measured, issue 9). On the tick thread that stopped the whole
loop: no heartbeats received, no messages read. Here the tick loop keeps passing while this
thread waits for the disk; when the sync returns it wakes the tick thread, which sends what the
sync released (``release``, at the end of every pass). The journal itself stays the tick
thread's: this thread only syncs a duplicate of its descriptor (``Journal.sync_point``) and
publishes the index that sync covered (``Journal.synced_in_background``). It also makes the
journal's periodic store of the commit index (two fsyncs; ``Journal.store_meta_later``), which
needs no answer held: the stored commit index never runs ahead of ``synced_index``, and the
journal's file compaction after a snapshot (``Journal.reclaim``, one step between two syncs, so
an acknowledgement waits for at most one step), and the directory fsync that makes a new dump's
name durable (``fsync_directory_later``: nothing waits for it, the journal syncs the directory
again before it drops an entry the dump covers). A term or
vote is still stored on the tick thread before the message that reflects it is sent.

While the disk is quick, the sync an acknowledgement waits for is made on the tick thread
instead, right before the acknowledgement leaves (``kvstore.node.quick_disk`` says when): the
hand-off to this thread and back cost a follower's turn more than the sync itself.

The leader's journal is synced here too (a ``request`` at the end of each tick): it holds no
acknowledgement, and its commit counts its own copy only up to ``synced_index``
(``kvstore.node.durable``). A cluster of one node still syncs on its tick thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from kvstore.node.journal import Journal, JournalFailed, SyncPoint, fsync_path
from kvstore.node.quick_disk import QuickDisk

log = logging.getLogger("kvstore.node.sync_thread")

ACKNOWLEDGEMENT = "next_node_idx"
STOP_WAIT = 5.0
"""How long ``stop`` waits for a sync stuck on the disk before it leaves the (daemon) thread
behind: a node stopping must not hang on a disk that no longer answers."""


def claims(message: Any) -> int:
    """The last log index ``message`` vouches is stored here (0: it vouches for nothing)."""
    if type(message) is dict and message.get("type") == ACKNOWLEDGEMENT and message.get("success"):
        return int(message["next_node_idx"]) - 1
    return 0


class SyncThread:
    """Syncs the journal in the background and holds acknowledgements until it has."""

    def __init__(self, journal: Journal, send: Callable[[Any, Any], Any],
                 wake: Callable[[], None], counters: Counter[str], *,
                 disk_busy: Callable[[], bool] | None = None) -> None:
        """``disk_busy``: whether this node writes something else to the disk now (a
        snapshot); None: the tick thread never syncs (every sync is made here)."""
        self._journal = journal
        self._send = send
        self._wake = wake
        self._counters = counters
        self._held: list[tuple[Any, Any]] = []
        """Messages waiting for a sync, in the order they were sent (tick thread only)."""
        self._wanted: SyncPoint | None = None
        self._meta_wanted = False
        self._reclaim_wanted = False
        self._directories: set[str] = set()
        self._reclaiming: Iterator[None] | None = None
        """The compaction in progress (this thread only)."""
        self._stopped = False
        self._busy = False
        """This thread is doing what it was asked (set and cleared under ``_cond``)."""
        self._disk_busy = disk_busy
        self.disk = QuickDisk()
        self._cond = threading.Condition()
        counters["journal_background_fsyncs"] = 0  # only this thread writes it, from now on
        counters["journal_file_compactions"] = 0  # this one too
        counters["acks_held"] += 0
        counters["journal_inline_fsyncs"] += 0  # syncs made on the tick thread (quick_disk)
        journal.store_meta_later = self._want_meta
        journal.reclaim_later = self._want_reclaim
        self._thread = threading.Thread(target=self._run, daemon=True, name="journal-sync")
        self._thread.start()

    # -- on the tick thread ---------------------------------------------------------------

    def send(self, node: Any, message: Any) -> Any:
        """In place of the transport's ``send``: sends now (after a sync on this thread, if
        the disk is quick), or holds until durable."""
        claim = claims(message)
        if not self._held and claim > self._journal.synced_index and self._may_sync_here():
            self.disk.timed(self._journal.sync)
            self._counters["journal_inline_fsyncs"] += 1
        if self._held or claim > self._journal.synced_index:
            self._held.append((node, message))
            self._counters["acks_held"] += 1
            self.request()
            return None
        return self._send(node, message)

    def request(self) -> None:
        """Asks for a sync of everything appended so far (nothing if nothing was)."""
        point = self._journal.sync_point()
        if point is None:
            return
        with self._cond:
            if self._wanted is not None:
                self._wanted.close()  # the new point covers it
            self._wanted = point
            self._cond.notify()

    def _may_sync_here(self) -> bool:
        """``kvstore.node.quick_disk``'s rule: nothing else of ours on the disk, which was quick."""
        if self._disk_busy is None or self._disk_busy() or not self.disk.quick():
            return False
        with self._cond:
            return not (self._busy or self._has_work())

    def _has_work(self) -> bool:
        """Work asked of the sync thread or under way on it; call with ``_cond`` held."""
        return bool(self._wanted is not None or self._meta_wanted or self._reclaim_wanted
                    or self._reclaiming is not None or self._directories)

    def release(self) -> None:
        """Sends, in order, the held messages whose claims are now on disk."""
        while self._held and claims(self._held[0][1]) <= self._journal.synced_index:
            node, message = self._held.pop(0)
            self._send(node, message)

    def _want_meta(self) -> None:
        """The journal's periodic store of the commit index, for this thread to make."""
        with self._cond:
            self._meta_wanted = True
            self._cond.notify()

    def _want_reclaim(self) -> None:
        """A compaction of the journal's file, for this thread to make."""
        with self._cond:
            self._reclaim_wanted = True
            self._cond.notify()

    def fsync_directory_later(self, path: str) -> None:
        """A rename in ``path`` made durable on this thread, not the tick thread."""
        with self._cond:
            self._directories.add(path)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            if self._wanted is not None:
                self._wanted.close()
                self._wanted = None
            self._cond.notify()
        self._thread.join(STOP_WAIT)

    # -- on the sync thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                while not self._stopped and not self._has_work():
                    self._cond.wait()
                if self._stopped:
                    return
                point, self._wanted = self._wanted, None
                meta, self._meta_wanted = self._meta_wanted, False
                directories, self._directories = self._directories, set()
                if self._reclaiming is None and self._reclaim_wanted:
                    self._reclaim_wanted = False
                    self._reclaiming = self._journal.reclaim()
                self._busy = True
            try:
                if point is not None:
                    self._journal.synced_in_background(point)
                    self._counters["journal_background_fsyncs"] += 1
                    self._wake()
                if meta:
                    self._journal.store_meta(background=True)
                for path in directories:
                    try:
                        fsync_path(path)
                    except OSError:
                        # Log text only: not mutated.
                        log.exception("fsync of the directory %s failed", path)  # pragma: no mutate
                if self._reclaiming is not None:
                    self._step_reclaim()
            except JournalFailed:
                self._wake()  # the journal has told the node, which stops
                return

    def _step_reclaim(self) -> None:
        assert self._reclaiming is not None
        try:
            next(self._reclaiming)
        except StopIteration:
            self._reclaiming = None
            self._counters["journal_file_compactions"] += 1
