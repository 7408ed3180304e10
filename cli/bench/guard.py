"""The guard: cleans up after a ``kv bench`` that was killed before its ``finally`` could run.

Normally ``kv bench`` stops its targets itself. But a SIGKILL (or an OOM kill) runs no
``finally``, and the nodes of a detached cluster are nobody's children. So ``kv bench`` starts
this small process first (``python -m cli.bench.guard``, in its own session, ignoring Ctrl-C)
and tells it, one line per directory on its stdin, what it creates. The guard waits for its
stdin to close, which happens however ``kv bench`` ends; then, for each directory that still
exists, it brings down our cluster in it (``kv cluster down``), SIGKILLs any process whose
command line names the directory, and removes it. After a normal run there is nothing left, and
it exits at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


class Guard:
    """The coordinator's handle on the guard process."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cli.bench.guard"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def register(self, kind: str, directory: Path) -> None:
        """``kind`` is ``ours`` (a cluster directory under ``directory/cluster``) or ``dir``."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{kind} {directory}\n".encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the guard is gone; the normal clean-up still runs

    def close(self, timeout: float = 60.0) -> None:
        """Closes the guard's stdin and waits for it (after the normal clean-up: a no-op)."""
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)


def clean(kind: str, directory: Path) -> None:
    from cli.bench.stats import kill_leftovers

    if not directory.exists():
        return
    try:
        if kind == "ours":
            from cli.bench.ours import bring_down

            bring_down(directory)
    finally:
        kill_leftovers(str(directory))
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    registered = []
    for line in sys.stdin:
        kind, _, path = line.rstrip("\n").partition(" ")
        if path:
            registered.append((kind, Path(path)))
    for kind, directory in registered:
        try:
            clean(kind, directory)
        except Exception as exc:  # noqa: BLE001 - go on with the other directories
            print(f"kv bench guard: {directory}: {exc}", file=sys.stderr)
    os._exit(0)


if __name__ == "__main__":
    main()
