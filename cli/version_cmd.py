"""``kv version`` and ``kv --version``: this build and the versions it runs on.

PySyncObj is pinned exactly (the node layer fences defects of 0.3.17), so a bug report needs
its version as much as ours.
"""

from __future__ import annotations

import platform
from importlib import metadata

import click

from cli.kv_click import KvCommand
from cli.output import Report, emit
from cli.settings import Settings, global_options

DISTRIBUTION = "kvstore-sessions"
COMPONENTS = ("pysyncobj", "grpcio", "protobuf", "click")


def versions() -> dict[str, str]:
    """``{"kv": ..., "pysyncobj": ..., ..., "python": ...}``."""
    found = {"kv": _version(DISTRIBUTION)}
    found |= {name: _version(name) for name in COMPONENTS}
    found["python"] = platform.python_version()
    return found


def lines() -> list[str]:
    """etcdctl's shape: ``kv version: 0.1.0``, one component per line."""
    return [f"{name} version: {value}" for name, value in versions().items()]


def print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """The root's eager ``--version`` flag."""
    if value and not ctx.resilient_parsing:
        for line in lines():
            click.echo(line)
        ctx.exit(0)


@click.command(cls=KvCommand)
@global_options
def version() -> None:
    """Prints the version of kv and of what it runs on."""
    found = versions()
    emit(Report(found, ["component", "version"], [[k, v] for k, v in found.items()], lines()),
         Settings.current().write_out)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
