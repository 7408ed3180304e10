"""The value types of the command line: durations, integers and endpoints, with plain messages.

One parser per kind of value, shared by every command, so ``--timeout 5s`` works wherever
``--duration 5s`` does. Durations follow etcdctl (Go's ``time.ParseDuration``): ``500ms``, ``5s``,
``1m``, ``1h``, ``1m30s``; a bare number is seconds, as the options always accepted.
"""

from __future__ import annotations

import re

import click

from kvstore.config import ConfigError, split_address

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (``1m30s``, ``500ms``, ``2.5``); ``ValueError`` if it is not one."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    parts = _PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(text)
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


class Duration(click.ParamType):
    """A duration in seconds (a float); with ``positive``, zero is refused."""

    name = "duration"

    def __init__(self, *, positive: bool = True) -> None:
        self.positive = positive

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a duration (like 500ms, 5s or 1m)", param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{value!r} is not a positive duration", param, ctx)
        return seconds


class Integer(click.IntRange):
    """An integer within bounds, refused in words a user reads ("'abc' is not an integer")."""

    name = "integer"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if not isinstance(value, int):
            try:
                value = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        converted: int = super().convert(value, param, ctx)
        return converted


def endpoints(text: str | None) -> list[str]:
    """``host:port,host:port`` as a list; ``click.BadParameter`` names the first bad one."""
    found = [e.strip() for e in (text or "").split(",") if e.strip()]
    for endpoint in found:
        try:
            split_address(endpoint)
        except ConfigError:
            raise click.BadParameter(f"{endpoint!r} is not HOST:PORT") from None
    return found
