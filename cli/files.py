"""Writing files so that a crash or a concurrent reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Writes ``data`` to ``path``: readers see the old content or the new one, never a mix.

    The bytes go to a temporary file in the same directory, are flushed to disk, and the file
    is then renamed over ``path`` (``os.replace``), which is atomic. The directory is synced
    too so the rename survives a power cut. The temporary file is created with mode 0600, so a
    secret is never readable by others, not even briefly; ``mode`` is applied before the rename.

    With ``exclusive`` the file is hard-linked into place instead of renamed, which fails with
    ``FileExistsError`` if ``path`` exists: creating without ever overwriting.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
