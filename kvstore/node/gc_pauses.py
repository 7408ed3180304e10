"""Pauses of Python's cyclic garbage collector, measured (issue 9: the tick thread's budget).

A collection holds the interpreter from start to end: no other thread runs, the Raft tick
thread included. How long it takes grows with the number of container objects the collector
tracks (a collection of the oldest generation visits every one of them, and everything they
hold), so a node holding a large state can stop for a long time without doing anything
visible. This module times every collection, by generation, through ``gc.callbacks``, so that
status and metrics show it next to the longest gap between two passes of the Raft loop.

The callbacks are process-wide (there is one collector); ``install`` is idempotent.

And one cut (``freeze_start_up``): what a node process holds once it serves (modules, classes,
functions, gRPC's, protobuf's and PySyncObj's structures: some 40,000 containers) lives as
long as the process, yet every collection of the oldest generation visited all of it again. At
1M keys, on a busy 2-core machine, such a collection took 180-330 ms (``benchmarks/
big_state.py``), once on a new member's tick thread as its restore began. Frozen
(``gc.freeze``), those objects are out of the collector's reach; it visits only what came after.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger("kvstore.node.gc")

LONG_PAUSE = 0.05
"""A collection that is logged (at INFO): half of the tick thread's 100 ms budget."""
GENERATIONS = 3


class GcPauses:
    """Counts, total and longest pause of each generation's collections since ``install``."""

    def __init__(self) -> None:
        self.count = [0] * GENERATIONS
        self.total = [0.0] * GENERATIONS
        self.longest = [0.0] * GENERATIONS
        self._started: float | None = None

    @property
    def seconds(self) -> float:
        """All collections together (what a gap between two passes can be compared with)."""
        return sum(self.total)

    def longest_pause(self) -> float:
        return max(self.longest)

    def on_collection(self, phase: str, info: dict[str, int]) -> None:
        """The ``gc.callbacks`` hook: called at the start and the stop of each collection, on
        whichever thread triggered it, with the interpreter held throughout."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return  # installed during a collection
        took = time.perf_counter() - self._started
        self._started = None
        generation = info["generation"]
        self.count[generation] += 1
        self.total[generation] += took
        self.longest[generation] = max(self.longest[generation], took)
        if took >= LONG_PAUSE:
            # INFO, not WARNING: status and metrics carry the longest pause, which is what an
            # operator acts on; a collection while a command fails (or the process exits) must
            # not add a second line to that command's one-line error.
            # Which thread: one that the OS runs less often stretches a collection (issue 9).
            log.info("garbage collection of generation %d took %.0f ms (%d objects freed, "
                     "on thread %s)", generation, took * 1e3, info.get("collected", 0),
                     threading.current_thread().name)


def freeze_start_up() -> int:
    """After a last full collection, moves every object alive now to the collector's permanent
    generation, which it never visits; returns how many. For a process that is a node (``kv
    node run``): a program embedding one owns its collector, and its objects are its own."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


_lock = threading.Lock()
_installed: GcPauses | None = None


def install() -> GcPauses:
    """Starts timing the collections of this process (once); returns the one recorder."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = GcPauses()
            gc.callbacks.append(_installed.on_collection)
        return _installed
