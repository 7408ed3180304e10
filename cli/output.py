"""The output formats of every command: ``simple`` (etcdctl's default), ``json`` and ``table``.

A command builds one ``Report`` holding its answer in all three shapes, and ``emit`` prints the
one the user chose. Keys and values are bytes; JSON shows them as UTF-8 strings, because
etcdctl's base64 keys are a known wart, and only a value that is not UTF-8 falls back to base64,
under a name that says so (``{"value_b64": ...}``) so it is never mistaken for text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

import click

FORMATS = ("simple", "json", "table")

Line = str | bytes


@dataclass(frozen=True)
class Report:
    """A command's answer in every output format."""

    data: object
    """What ``-w json`` prints: plain JSON values (use ``json_bytes`` for keys and values)."""
    header: Sequence[str]
    """Column names of ``-w table``."""
    rows: Sequence[Sequence[str]]
    """Rows of ``-w table``."""
    simple: Sequence[Line] | None = None
    """Lines of ``-w simple``; bytes are written as they are (a value may be binary).
    Default: each row, its cells joined by ", " (etcdctl's simple format for tables)."""


def emit(report: Report, fmt: str) -> None:
    """Prints ``report`` to stdout in format ``fmt`` (one of ``FORMATS``)."""
    if fmt == "json":
        click.echo(json.dumps(report.data, ensure_ascii=False))
    elif fmt == "table":
        click.echo(table(report.header, report.rows))
    else:
        lines = report.simple if report.simple is not None else [", ".join(r) for r in report.rows]
        for line in lines:
            click.echo(line)


def json_bytes(name: str, data: bytes) -> dict[str, str]:
    """``{name: text}`` if ``data`` is UTF-8, else ``{name + "_b64": base64}``."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_b64": base64.b64encode(data).decode("ascii")}


def text(data: bytes) -> str:
    """``data`` for a table cell or a message: UTF-8, with undecodable bytes as ``\\xNN``."""
    return data.decode("utf-8", errors="backslashreplace")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An ASCII table in etcdctl's style (upper-case centred header, left-aligned cells)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str], align: str) -> str:
        return "|" + "|".join(f" {c:{align}{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = line([h.upper() for h in header], "^")
    return "\n".join([rule, head, rule, *(line(row, "<") for row in rows), rule])


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 key``, ``2 keys``; ``plural`` for nouns that do not just take an s."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"
