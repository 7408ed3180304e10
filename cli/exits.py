"""Exit codes and the one-line message for every failure the user can cause or meet.

The codes follow etcdctl where it has one, and add 4 for "outcome unknown", which etcdctl lacks:
a script must be able to tell "not applied, retry anywhere" (2) from "maybe applied, retry only
with the same session" (4); and 6 for refused credentials (no or a wrong client certificate, or
a role that may not do this), where retrying cannot help until the certificate changes.
"""

from __future__ import annotations

import click

from kvstore.config import CannotRestart, ConfigError
from kvstore.errors import KVError
from session import SessionError

OK = 0
ERROR = 1
UNAVAILABLE = 2
INVALID_INPUT = 3
OUTCOME_UNKNOWN = 4
INTERRUPTED = 5
ACCESS_DENIED = 6
BAD_ARGUMENTS = 128


class CliError(Exception):
    """A failure the CLI detected itself, with the exit code that classifies it."""

    def __init__(self, message: str, exit_code: int = ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` for an expected failure; ``None`` for a bug.

    Everything the user can cause (bad arguments, a bad file, an unreachable cluster, an
    error answer) is expected and gets one line. Anything else is a bug in this program and
    deserves a traceback (shown with ``--debug``).
    """
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return BAD_ARGUMENTS, exc.format_message() + hint
    if isinstance(exc, click.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return INTERRUPTED, "interrupted"
    if isinstance(exc, (CliError, KVError)):
        return exc.exit_code, str(exc)
    if isinstance(exc, CannotRestart):
        return ERROR, str(exc)
    if isinstance(exc, (ConfigError, SessionError)):
        return INVALID_INPUT, str(exc)
    if isinstance(exc, OSError):
        return ERROR, _os_error_message(exc)
    return None


def one_line(message: str) -> str:
    """The message on one line: errors are one line on stderr, whatever the library said."""
    return " ".join(message.split()) or "unknown error"


def _os_error_message(exc: OSError) -> str:
    if exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)
