"""Where the time of a long gap between two passes of the Raft loop went (issue 9's budget).

A gap alone says that the tick thread did not come round; this says why, so that a long one
can be blamed on the right thing. At each pass the tick thread samples four cumulative clocks,
and a gap over the budget is logged with how much each moved meanwhile:

* ``cpu``: the tick thread's own CPU time (its own work: applying, encoding, pickling);
* ``runq``: time the tick thread was runnable but waiting for a core (Linux's per-thread
  ``schedstat``): the machine, or this process's other threads, had the cores;
* ``gc``: time the process spent in Python's garbage collector (``kvstore.node.gc_pauses``),
  during which no thread runs Python;
* ``io``: time in the tick thread's own journal writes to disk (fdatasync, the meta file,
  compaction), less its waits for a core meanwhile (those are in ``runq``): the disk's share.

What is left of the gap (gap minus cpu, runq and io) is time the tick thread was asleep
otherwise: mostly waiting for the interpreter lock held by another thread (or in ``poll``,
at most the idle timeout).

Reading ``schedstat`` costs about 3 us per pass; without it (not Linux) ``runq`` is absent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


class Causes:
    """The clocks of the calling thread (make it on the tick thread)."""

    def __init__(self, gc_seconds: Callable[[], float], io_seconds: Callable[[], float]) -> None:
        self._gc_seconds = gc_seconds
        self._io_seconds = io_seconds
        try:
            self._fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat",
                               os.O_RDONLY)
        except OSError:
            self._fd = -1
        self.names = ("cpu", "runq", "gc", "io") if self._fd >= 0 else ("cpu", "gc", "io")

    def probe(self) -> tuple[float, ...]:
        if self._fd < 0:
            return time.thread_time(), self._gc_seconds(), self._io_seconds()
        on_cpu, waiting = self._schedstat()
        return on_cpu, waiting, self._gc_seconds(), self._io_seconds()

    def wall_less_runq(self) -> float:
        """A clock that stands still while this thread waits for a core (for ``io``)."""
        if self._fd < 0:
            return time.perf_counter()
        return time.perf_counter() - self._schedstat()[1]

    def _schedstat(self) -> tuple[float, float]:
        """Seconds this thread has run on a core, and waited runnable for one."""
        on_cpu, waiting, _ = os.pread(self._fd, 64, 0).split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9


def explain(names: tuple[str, ...], before: tuple[float, ...], after: tuple[float, ...]) -> str:
    """``cpu 16, runq 310, gc 0, io 366``: milliseconds each clock moved."""
    return ", ".join(f"{name} {(b - a) * 1e3:.0f}" for name, a, b in zip(names, before, after))
