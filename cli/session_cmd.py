"""``kv session open|show|close``: a client session that outlives one command, in a file.

A session is what makes a retry safe: the cluster remembers the answer to each of its requests,
so a request sent twice is applied once. ``kv`` commands are separate processes, so the session
lives in a file between them (see ``cli.session_file``)::

    kv session open --session s.json
    kv incr hits --session s.json     # times out: outcome unknown (exit 4)
    kv incr hits --session s.json     # the same request again: applied at most once
    kv session close --session s.json
"""

from __future__ import annotations

from pathlib import Path

import click

from cli import session_file
from cli.exits import CliError
from cli.kv_click import KvGroup
from cli.output import Report, emit
from cli.settings import Settings, global_options
from session import Session

path_option = click.option(
    "--session", "path", required=True, metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path), help="The session file.",
)


@click.group(cls=KvGroup)
def session() -> None:
    """Client sessions kept in a file, for writes that are safe to retry."""


@session.command("open")
@path_option
@global_options
def open_(path: Path) -> None:
    """Registers a new session with the cluster and saves it in FILE (mode 0600)."""
    # Checked before registering, so that a session is not opened only to be lost.
    if path.exists():
        raise CliError(f"{path} already exists: close that session first or choose another file")
    if not path.absolute().parent.is_dir():
        raise CliError(f"{path.absolute().parent} is not a directory")
    with Settings.current().client() as client:
        opened = client.sync_get_session()
    session_file.create(path, opened)
    emit(session_report(opened), Settings.current().write_out)


@session.command()
@path_option
@global_options
def show(path: Path) -> None:
    """Prints the session in FILE (without contacting the cluster)."""
    emit(session_report(session_file.read(path)), Settings.current().write_out)


@session.command()
@path_option
@global_options
def close(path: Path) -> None:
    """Unregisters the session in FILE, then deletes FILE.

    If the outcome is unknown (exit 4) the file stays: closing again is safe.
    """
    with Settings.current().client() as client, session_file.locked(path) as current:
        client.sync_close_session(current)
        path.unlink()
    closed = current.client_id
    emit(Report({"closed": closed}, ["closed"], [[str(closed)]], [f"closed session {closed}"]),
         Settings.current().write_out)


def session_report(s: Session) -> Report:
    fields = {name: getattr(s, name) for name in session_file.FIELDS}
    return Report(
        fields,
        list(fields),
        [[str(v) for v in fields.values()]],
        [f"{name}: {value}" for name, value in fields.items()],
    )
