"""A client session kept in a JSON file between ``kv`` commands.

Each ``kv`` command is a new process, so a session that should make a *retry* safe must outlive
it: the file holds the session's four fields, and its life follows the protocol in
``session.Session``:

* after a command whose answer came back, the file moves to the next series id
  (``proposal_completed``);
* after a command whose outcome is unknown (timeout, crash, Ctrl-C) the file is left as it was,
  so running the command again reuses the series id, and the cluster answers the retry from its
  cache instead of applying it twice.

Writes are atomic (temporary file + rename) and the file is private (0600): anyone holding it can
speak for the session. While a command uses the file it holds an exclusive lock on it, because
a session allows one request in flight: two commands running at once on the same series id
would get one answer between them, and one command would be silently dropped.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.exits import INVALID_INPUT, CliError
from cli.files import write_atomic
from session import (
    NOOP_SERIES_ID,
    NOT_SESSION_MANAGED_CLIENT_ID,
    SERIES_ID_FOR_REGISTER,
    SERIES_ID_FOR_UNREGISTER,
    Session,
    SessionError,
)

FIELDS = ("cluster_id", "client_id", "series_id", "responded_to")


class SessionFileError(CliError):
    """A file that does not hold a session (exit code 3: invalid input)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is not a session file: {reason}", INVALID_INPUT)


def encode(session: Session) -> bytes:
    """The file's content: the four fields as JSON integers, one per line."""
    fields = {name: getattr(session, name) for name in FIELDS}
    return (json.dumps(fields, indent=2) + "\n").encode()


def decode(path: Path, data: bytes) -> Session:
    """The session in a file's content; ``SessionFileError`` for anything else."""
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionFileError(path, f"not JSON ({exc})") from exc
    if not isinstance(fields, dict) or sorted(fields) != sorted(FIELDS):
        raise SessionFileError(path, f"expected an object with exactly {', '.join(FIELDS)}")
    try:
        return Session(**fields)
    except SessionError as exc:
        raise SessionFileError(path, str(exc)) from exc


def check_writable(path: Path, session: Session) -> None:
    """Refuses, in the CLI's words, a session in a file that cannot carry a write.

    ``kv session open`` never writes such a file; a hand-edited or foreign one may hold a
    session prepared for registering or closing, or a no-op session (which makes no retry
    safe, the one reason to keep a session in a file).
    """
    how = f"open a new one with 'kv session open --session {path}'"
    if session.client_id == NOT_SESSION_MANAGED_CLIENT_ID:
        reason = "client id 0 is reserved for the cluster's own entries"
    elif session.series_id == SERIES_ID_FOR_REGISTER:
        reason = "it is prepared for registering (series id 2^64-2), not for writes"
    elif session.series_id == SERIES_ID_FOR_UNREGISTER:
        reason = "it is prepared for closing (series id 2^64-1), not for writes"
    elif session.series_id == NOOP_SERIES_ID:
        reason = "series id 0 is a no-op session, which makes no retry safe"
    elif session.responded_to > session.series_id:
        reason = (f"responded_to {session.responded_to} is past series_id "
                  f"{session.series_id}")
    else:
        return
    raise CliError(f"the session in {path} cannot write: {reason}; {how}", INVALID_INPUT)


def read(path: Path) -> Session:
    """The session in ``path``, without locking (for showing it)."""
    return decode(path, _read_bytes(path))


def create(path: Path, session: Session) -> None:
    """Writes a new session file; refuses to overwrite one (that would orphan its session)."""
    try:
        write_atomic(path, encode(session), exclusive=True)
    except FileExistsError:
        raise CliError(
            f"{path} already exists: close that session first (kv session close) or choose "
            "another file"
        ) from None


def write(path: Path, session: Session) -> None:
    """Replaces the session in ``path`` atomically (the file stays 0600)."""
    write_atomic(path, encode(session))


@contextmanager
def locked(path: Path) -> Iterator[Session]:
    """Holds an exclusive lock on the session file for the duration of one command.

    Yields the session as the file holds it once the lock is ours. ``write`` replaces the file
    with a new inode, so a command that waited on the old inode would read a stale copy:
    after taking the lock we check that ``path`` still names the locked inode, and retry if not.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _missing(path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                with os.fdopen(os.dup(fd), "rb") as f:
                    session = decode(path, f.read())
                yield session
                return
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        raise _missing(path) from None
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _missing(path) from None


def _missing(path: Path) -> CliError:
    return CliError(f"no session file at {path} (open one with: kv session open --session {path})")
