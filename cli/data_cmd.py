"""The data commands: put, get, delete, incr, append, cas, and status of the endpoints in use.

Keys and values are taken from the command line as the bytes the shell passed (UTF-8 on any
sane system; ``os.fsencode`` restores undecodable bytes too). A VALUE of ``-`` is read from
stdin, raw, so binary values and values larger than the command line allows work.

Every write accepts ``--session FILE`` (see ``cli.session_file``): with it, a write whose outcome
was unknown can be run again and is applied at most once. Without it, the client still uses a
session of its own for its internal retries, but that session dies with the command.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli import session_file
from cli.exits import ERROR, INVALID_INPUT, OUTCOME_UNKNOWN, UNAVAILABLE, CliError
from cli.kv_click import KvCommand
from cli.output import Report, emit, json_bytes, text
from cli.params import Integer
from cli.settings import Settings, global_options
from kvstore.errors import (
    AlreadyResponded,
    KVError,
    OutcomeUnknown,
    ResultError,
    SeriesReused,
    SessionExpired,
)
from kvstore.limits import INT64_MAX, INT64_MIN
from kvstore.proto.log_pb2 import KeyValue, Result

if TYPE_CHECKING:
    from kvstore.client import Client, Consistency
    from session import Session

MIN_WRITE_TIME = 0.5
"""Seconds a write gets at least, even when registering its session took most of --timeout."""

Write = Callable[["Client", "Session", float], Result]
"""One write: proposes with the session, within the time limit in seconds."""

session_option = click.option(
    "--session", "session_path", type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write with the session in FILE (kv session open): rerunning a write whose outcome "
         "was unknown is then applied at most once.",
)


def write(session_path: Path | None, key: str, call: Write) -> Result:
    """Runs one write, with the session in ``session_path`` if given, and keeps the file in step.

    The file moves to the next series id only when the state machine answered: a result, or an
    error result (a ``ResultError``: the cluster cached that answer under this series id too).
    On any other error the outcome is unknown or the command never reached the log, and the
    file is left unchanged, so rerunning the same command retries the same series id.
    """
    settings = Settings.current()
    with settings.client() as client:
        if session_path is None:
            return _write_once(client, key, call, settings)
        with session_file.locked(session_path) as session:
            session_file.check_writable(session_path, session)
            try:
                result = call(client, session, settings.timeout)
            except SessionExpired as exc:
                raise CliError(
                    f"the session in {session_path} has expired or was closed, and the outcome "
                    f"of its last write is unknown: open a new session ({exc})"
                ) from exc
            except AlreadyResponded as exc:
                raise CliError(
                    f"the cluster already answered request {session.series_id} of this session "
                    f"and has forgotten the answer: {session_path} is an old copy ({exc})"
                ) from exc
            except SeriesReused as exc:
                raise CliError(
                    f"nothing applied: request {session.series_id} of the session in "
                    f"{session_path} was already used for another command, so the file is a "
                    f"copy in use elsewhere (or an old one): open a new session (SERIES_REUSED)",
                    INVALID_INPUT,
                ) from exc
            except OutcomeUnknown as exc:
                raise CliError(
                    "outcome unknown: the write may have been applied or not; run the same "
                    f"command again (with --session {session_path}): it is applied at most once",
                    OUTCOME_UNKNOWN,
                ) from exc
            except ResultError:
                _completed(session_path, session)
                raise
            _completed(session_path, session)
            return result


def _write_once(client: Client, key: str, call: Write, settings: Settings) -> Result:
    """A write without ``--session``: with a session of its own, opened and closed around it.

    The session makes the client's retries inside this command safe. It is closed even when
    the outcome is unknown: once the close is applied, no copy of the write still in flight can
    be applied (it would meet an unknown session), so the outcome is settled and the cluster
    does not keep a session nobody will use.
    """
    deadline = time.monotonic() + settings.timeout
    try:
        session = client.sync_get_session(timeout=settings.timeout)
    except OutcomeUnknown as exc:  # the write itself was never sent
        raise CliError(f"no answer in time while opening a session for the write: nothing was "
                       f"applied ({key} is unchanged); retry", UNAVAILABLE) from exc
    try:
        result = call(client, session, max(deadline - time.monotonic(), MIN_WRITE_TIME))
    except OutcomeUnknown as exc:
        closed = _close_quietly(client, session, settings.dial_timeout)
        later = ("and will not be applied later (its session is closed)" if closed
                 else "and may still be applied later")
        raise CliError(
            f"outcome unknown: the write may or may not have been applied, {later}; check with "
            f"'kv get {key}', and use --session FILE (kv session open) to make a retry safe",
            OUTCOME_UNKNOWN,
        ) from exc
    except BaseException:
        _close_quietly(client, session, settings.dial_timeout)
        raise
    _close_quietly(client, session, settings.dial_timeout)
    return result


def _close_quietly(client: Client, session: Session, timeout: float) -> bool:
    """Closes a throwaway session; whether the cluster confirmed it (else the LRU store evicts
    it eventually)."""
    try:
        client.sync_close_session(session, timeout=timeout)
    except KVError:
        return False
    return True


def _completed(path: Path, session: Session) -> None:
    session.proposal_completed()
    session_file.write(path, session)


def arg_bytes(arg: str) -> bytes:
    """A command-line argument as the bytes the shell passed."""
    return os.fsencode(arg)


def value_bytes(arg: str) -> bytes:
    """A VALUE argument: its bytes, or all of stdin for ``-``."""
    return sys.stdin.buffer.read() if arg == "-" else arg_bytes(arg)


def kvs_report(kvs: list[KeyValue], keys_only: bool, more: bool | None = None) -> Report:
    """etcdctl's get output: key line, value line; JSON ``{"count", "kvs": [{key, value}]}``,
    plus ``"more"`` for a prefix read (whether --limit left keys out)."""
    simple: list[bytes] = []
    docs = []
    for kv in kvs:
        simple.append(kv.key)
        doc = json_bytes("key", kv.key)
        if not keys_only:
            simple.append(kv.value)
            doc |= json_bytes("value", kv.value)
        docs.append(doc)
    header = ["key"] if keys_only else ["key", "value"]
    rows = [[text(kv.key)] if keys_only else [text(kv.key), text(kv.value)] for kv in kvs]
    data: dict[str, object] = {"count": len(kvs), "kvs": docs}
    if more is not None:
        data["more"] = more
    return Report(data, header, rows, simple)


def one_value(name: str, value: object) -> Report:
    """A report of a single value (a count, a number, a length)."""
    return Report({name: value}, [name], [[str(value)]])


@click.command(cls=KvCommand)
@click.argument("key")
@click.argument("value")
@session_option
@global_options
def put(key: str, value: str, session_path: Path | None) -> None:
    """Sets KEY to VALUE.

    \b
    VALUE "-" reads the value from stdin, as bytes, so a file or binary data works:
      kv put config - < config.json
      printf '\x00\x01' | kv put raw -
    """
    k, v = arg_bytes(key), value_bytes(value)
    write(session_path, key, lambda c, s, t: c.put(k, v, session=s, timeout=t))
    emit(Report({"ok": True}, ["result"], [["OK"]]), Settings.current().write_out)


@click.command(cls=KvCommand)
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Every key that starts with KEY (\"\": all keys).")
@click.option("--limit", type=Integer(min=0), default=0, metavar="N",
              help="With --prefix: at most N keys (0: no limit); -w json says \"more\": true "
                   "when keys were left out.")
@click.option("--keys-only", is_flag=True, help="Print keys without values.")
@click.option("--consistency", type=click.Choice(["l", "s"]), default="l", show_default=True,
              help="l: linearizable (through the log); s: serializable (this node's replica, "
                   "possibly stale).")
@global_options
def get(key: str, prefix: bool, limit: int, keys_only: bool, consistency: str) -> None:
    """Prints KEY and its value (exit 1 if it does not exist)."""
    if limit and not prefix:
        raise click.UsageError("--limit needs --prefix")
    level: Consistency = "linearizable" if consistency == "l" else "serializable"
    k = arg_bytes(key)
    settings = Settings.current()
    with settings.client() as client, _read_timeout():
        if prefix:
            # One key more than asked for tells whether the limit left any out.
            asked = limit + 1 if limit else 0
            kvs = list(client.range(k, limit=asked, keys_only=keys_only, consistency=level).kvs)
            more = bool(limit) and len(kvs) > limit
            emit(kvs_report(kvs[:limit] if more else kvs, keys_only, more), settings.write_out)
            return
        result = client.get(k, consistency=level)
    if not result.found:
        if settings.write_out == "json":
            emit(kvs_report([], keys_only), "json")  # a script parsing stdout gets JSON too
        raise CliError(f"key not found: {key}", ERROR)
    emit(kvs_report([KeyValue(key=k, value=result.value)], keys_only), settings.write_out)


@contextmanager
def _read_timeout() -> Iterator[None]:
    """A read that timed out changed nothing: it is unavailable (exit 2), not of unknown outcome
    (the client library cannot tell a read from a write in its timeout message)."""
    try:
        yield
    except OutcomeUnknown as exc:
        raise CliError("no answer in time (no leader, or one that cannot reach a quorum: see "
                       "'kv status'); a read changes nothing, so retrying is safe",
                       UNAVAILABLE) from exc


@click.command(cls=KvCommand)
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Delete every key that starts with KEY.")
@session_option
@global_options
def delete(key: str, prefix: bool, session_path: Path | None) -> None:
    """Deletes KEY and prints how many keys were deleted (alias: del)."""
    k = arg_bytes(key)
    result = write(session_path, key, lambda c, s, t: c.delete(k, prefix=prefix, session=s,
                                                               timeout=t))
    emit(one_value("deleted", result.count), Settings.current().write_out)


@click.command(cls=KvCommand, context_settings={"ignore_unknown_options": True})  # "-5" a DELTA
@click.argument("key")
@click.argument("delta", type=Integer(INT64_MIN, INT64_MAX), default=1)
@session_option
@global_options
def incr(key: str, delta: int, session_path: Path | None) -> None:
    """Adds DELTA (default 1, may be negative) to KEY's integer value; prints the new value.

    An absent key counts as 0.
    """
    k = arg_bytes(key)
    result = write(session_path, key, lambda c, s, t: c.incr(k, delta, session=s, timeout=t))
    emit(one_value("value", result.number), Settings.current().write_out)


@click.command(cls=KvCommand)
@click.argument("key")
@click.argument("value")
@session_option
@global_options
def append(key: str, value: str, session_path: Path | None) -> None:
    """Appends VALUE to KEY's value (VALUE "-": stdin); prints the new length."""
    k, v = arg_bytes(key), value_bytes(value)
    result = write(session_path, key, lambda c, s, t: c.append(k, v, session=s, timeout=t))
    emit(one_value("length", result.length), Settings.current().write_out)


@click.command(cls=KvCommand)
@click.argument("key")
@click.argument("value")
@click.option("--expect", metavar="OLD", help="Swap only if KEY holds OLD.")
@click.option("--expect-absent", is_flag=True, help="Swap only if KEY does not exist.")
@session_option
@global_options
def cas(key: str, value: str, expect: str | None, expect_absent: bool,
        session_path: Path | None) -> None:
    """Compare-and-swap: sets KEY to VALUE if it holds OLD (or is absent).

    Prints whether it swapped and the value KEY now holds; exits 1 if it did not swap.
    VALUE "-" reads it from stdin.
    """
    if (expect is None) == (not expect_absent):
        raise click.UsageError("give exactly one of --expect OLD or --expect-absent")
    k, v = arg_bytes(key), value_bytes(value)
    expected = None if expect_absent else arg_bytes(expect or "")
    result = write(session_path, key,
                   lambda c, s, t: c.cas(k, v, expected=expected, session=s, timeout=t))
    emit(cas_report(result), Settings.current().write_out)
    if not result.swapped:
        raise CliError(f"compare failed: {key} " + (
            "exists" if expect_absent else "does not hold the expected value"))


def cas_report(result: Result) -> Report:
    verdict = "swapped" if result.swapped else "not swapped"
    data: dict[str, object] = {"swapped": result.swapped, "found": result.found}
    if result.found:
        data |= json_bytes("value", result.value)
        simple: list[str | bytes] = [verdict, result.value]
    else:
        simple = [f"{verdict}: key absent"]
    row = [verdict, text(result.value) if result.found else "(absent)"]
    return Report(data, ["result", "value"], [row], simple)


COMMANDS = (put, get, delete, incr, append, cas)
