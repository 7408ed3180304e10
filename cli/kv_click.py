"""The click classes of every ``kv`` command: what its help shows, and how a group is called.

* Every subcommand's ``--help`` lists its own options, then the global ones (``-w``,
  ``--endpoints``, the timeouts...), which are accepted before or after the subcommand.
* A group called without a subcommand (``kv``, ``kv cluster``) prints its help and exits 0,
  as etcdctl does; click would raise a usage error holding the whole help text.
* A group may have aliases (``kv del`` is ``kv delete``, as etcdctl users type it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from cli.settings import GLOBAL_PARAM_NAMES, global_help_records


class KvCommand(click.Command):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own = []
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument) or param.name in GLOBAL_PARAM_NAMES:
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                own.append(record)
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        if any(param.name in GLOBAL_PARAM_NAMES for param in self.params):
            with formatter.section("Global options (before or after the command)"):
                formatter.write_dl(global_help_records(ctx))


class KvGroup(click.Group):
    command_class = KvCommand
    group_class = type  # subgroups are KvGroups too

    def __init__(self, *args: Any, aliases: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))
