"""Helpers shared by the tests: waiting on a condition with a deadline, and a free port.

Tests never sleep and hope: they poll a condition until a deadline, and fail saying what they
were waiting for.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from hypothesis import settings

from cli.ports import free_port  # noqa: F401 - the tests take it from here

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *,
             error: type[Exception] = AssertionError, poll: float = 0.05) -> T:
    """Polls ``predicate`` until it returns something truthy, which is returned; raises
    ``error`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


MUTATION_EXAMPLES = 20
"""The most examples a property test tries under mutmut (``tests/conftest.py`` says why)."""


def under_mutmut() -> bool:
    """mutmut sets ``MUTANT_UNDER_TEST`` in every process it runs tests in; nothing else does."""
    return "MUTANT_UNDER_TEST" in os.environ


def mutation_settings(given: settings, examples: int = MUTATION_EXAMPLES,
                      **changes: object) -> settings:
    """``given`` as it runs under mutmut: at most ``examples`` examples, the same ones every
    run, and any other ``changes``; ``given`` itself everywhere else."""
    if not under_mutmut():
        return given
    return settings(given, max_examples=min(given.max_examples, examples), derandomize=True,
                    database=None, **changes)  # type: ignore[arg-type]




def flock_waiters(path: str | os.PathLike[str]) -> int:
    """How many ``flock`` calls are blocked waiting for a lock on the file (Linux /proc/locks:
    a waiter's line reads ``N: -> FLOCK ...``, with the file as major:minor:inode)."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as locks:
        return sum(1 for line in locks
                   if "->" in line.split() and "FLOCK" in line.split() and inode in line.split())


# -- what is on disk, seen from outside the process that wrote it ------------------------------

_CACHESTAT = 451
"""cachestat(2) (Linux 6.5+; the same number on every architecture): page-cache statistics of
a file's range, among them how many of its pages are dirty (written, not yet on the disk)."""


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def dirty_pages(path: str | os.PathLike[str]) -> int:
    """How many pages of the file are in memory only: dirty, or still being written back.

    The page cache is shared: this sees what any process wrote to the file (``write`` or a
    shared ``mmap``) and did not yet get onto the disk. Zero means a power loss now would find
    the file's data as it reads now. (The file's size and name are metadata: not counted.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        whole_file, stat = _CachestatRange(0, 0), _Cachestat()
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(whole_file), ctypes.byref(stat), 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cachestat({path}): {os.strerror(errno)}")
        return int(stat.nr_dirty + stat.nr_writeback)
    finally:
        os.close(fd)


def why_dirty_pages_cannot_tell(directory: str | os.PathLike[str]) -> str | None:
    """None if ``dirty_pages`` works for files under ``directory``: a file written there shows
    dirty pages, and none once fsynced. Otherwise the reason (an old kernel, or tmpfs, which
    has no disk to write back to), for a test to skip with."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory) as probe:
            probe.write(b"x" * 4096)
            probe.flush()
            written = dirty_pages(probe.name)
            os.fsync(probe.fileno())
            synced = dirty_pages(probe.name)
    except OSError as exc:
        return f"cachestat(2) is not available: {exc}"
    if written == 0 or synced != 0:
        return (f"the file system of {directory} does not show writeback in the page cache "
                f"(dirty pages: {written} after a write, {synced} after fsync)")
    return None


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], grace: float = 15.0) -> None:
    """SIGTERM to every process, then a wait of ``grace`` seconds each; SIGKILL for any still
    running (node processes a test started by hand, as a user on several machines would)."""
    procs = list(procs)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
