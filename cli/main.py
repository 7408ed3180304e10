"""The ``kv`` command: its root group, and the one place that turns failures into exit codes.

Every error is one line on stderr, ``Error: ...``, with an exit code that says what to do about
it (see ``cli.exits``). A traceback means a bug in this program, and is shown only with
``--debug`` or ``KV_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from cli import (
    bench_cmd,
    cert_cmd,
    check_cmd,
    cluster_cmd,
    data_cmd,
    demo,
    exits,
    member_cmd,
    node_cmd,
    session_cmd,
    snapshot_cmd,
    status_cmd,
    version_cmd,
)
from cli.kv_click import KvGroup
from cli.settings import Settings, root_options

ALIASES = {"del": "delete"}
"""Other names of commands, as etcdctl users type them."""


@click.group(cls=KvGroup, aliases=ALIASES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=version_cmd.print_version, help="Print the version and exit.")
@root_options
def kv() -> None:
    """A replicated key-value store that applies every write exactly once.

    \b
    Start a local three-node cluster, then use it:
      kv cluster up --detach
      kv put greeting hello
      kv get greeting

    The options below may also follow the subcommand (kv get k -w json).

    Exit codes: 0 ok, 1 error (also: key not found, compare failed), 2 unavailable,
    3 invalid input, 4 outcome unknown (retry with the same --session), 5 interrupted,
    6 access denied (certificate missing or refused, or its role may not), 128 bad arguments.
    """


for command in (*data_cmd.COMMANDS, status_cmd.status, status_cmd.health, session_cmd.session,
                cluster_cmd.cluster, member_cmd.member, snapshot_cmd.snapshot, node_cmd.node,
                cert_cmd.cert, demo.demo, check_cmd.check, bench_cmd.bench, version_cmd.version):
    kv.add_command(command)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Runs the command line and exits (``cli.launch`` calls it: ``kv``, ``python -m cli``)."""
    sys.exit(run(sys.argv[1:] if argv is None else list(argv)))


def run(args: list[str]) -> int:
    """Runs one command line and returns its exit code; prints at most one error line."""
    ctx: click.Context | None = None
    try:
        ctx = kv.make_context("kv", args)
        with ctx:
            kv.invoke(ctx)
        return exits.OK
    except click.exceptions.Exit as exc:  # --help, or a command's deliberate exit
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`kv get --prefix "" | head -1`): not worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exits.ERROR
    except (Exception, KeyboardInterrupt) as exc:  # the top level: every failure ends here
        described = exits.describe(exc)
        if described is None:
            if _debug(ctx):
                raise
            code, message = exits.ERROR, (
                f"internal error: {type(exc).__name__}: {exc} "
                "(rerun with --debug or KV_DEBUG=1 for the traceback)"
            )
        else:
            code, message = described
        click.echo(f"Error: {exits.one_line(message)}", err=True)
        return code


def _debug(ctx: click.Context | None) -> bool:
    if ctx is not None and isinstance(ctx.obj, Settings):
        return ctx.obj.debug
    return os.environ.get("KV_DEBUG", "") not in ("", "0")
