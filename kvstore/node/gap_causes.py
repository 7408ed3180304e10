"""Where the time of a long gap between two passes of the Raft loop went (issue 9's budget).

A gap alone says that the tick thread did not come round; this says why, so that a long one
can be blamed on the right thing. At each pass the tick thread samples four cumulative clocks,
and a gap over the budget is logged with how much each moved meanwhile:

* ``cpu``: the tick thread's own CPU time (its own work: applying, encoding, pickling);
* ``runq``: time the tick thread was runnable but waiting for a core (Linux's per-thread
  ``schedstat``): the machine, or this process's other threads, had the cores;
* ``gc``: time the process spent in Python's garbage collector (``kvstore.node.gc_pauses``),
  during which no thread runs Python;
* ``io``: wall time of the tick thread's own journal writes to disk (fdatasync, the meta file,
  compaction), *including* any wait for a core once the disk has answered: ``io`` and
  ``runq`` overlap.

What is left of the gap (gap minus cpu minus runq minus io, roughly) is time the tick thread
was asleep: waiting for the interpreter lock held by another thread, or in ``poll``.

Reading ``schedstat`` costs about 3 us per pass; without it (not Linux) ``runq`` is absent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

Probe = Callable[[], tuple[float, ...]]


def probe_on_this_thread(gc_seconds: Callable[[], float],
                         io_seconds: Callable[[], float]) -> tuple[tuple[str, ...], Probe]:
    """The names and the sampling function of the clocks above, for the calling thread (call
    it on the tick thread)."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        def without_runq() -> tuple[float, ...]:
            return time.thread_time(), gc_seconds(), io_seconds()
        return ("cpu", "gc", "io"), without_runq

    def probe() -> tuple[float, ...]:
        on_cpu, waiting, _ = os.pread(fd, 64, 0).split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9, gc_seconds(), io_seconds()
    return ("cpu", "runq", "gc", "io"), probe


def explain(names: tuple[str, ...], before: tuple[float, ...], after: tuple[float, ...]) -> str:
    """``cpu 16, runq 310, gc 0, io 366``: milliseconds each clock moved."""
    return ", ".join(f"{name} {(b - a) * 1e3:.0f}" for name, a, b in zip(names, before, after))
