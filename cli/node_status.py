"""The status of nodes, as ``kv status`` and ``kv cluster status`` show it: one list of columns.

Both commands ask each node for its ``Status`` and render the answers with ``COLUMNS``, so they
show the same fields under the same names, with the same digest, and exit alike (0 when at
least one node answered, 2 when none did). ``kv cluster status`` adds what only the local
cluster directory knows: each node's process. A new field is one more ``Column``.

A node that does not answer is a row too, with its ``error`` in words: ``unreachable``, or
``not running`` when the local cluster directory knows its process is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cli.exits import UNAVAILABLE, CliError
from cli.output import Report
from kvstore.errors import AccessDenied, KVError

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.proto.api_pb2 import NodeStatus

Row = dict[str, object]

UNREACHABLE = "unreachable"
NOT_RUNNING = "not running"


@dataclass(frozen=True)
class Column:
    name: str
    """The JSON field, and (upper-cased) the table's header."""
    field: Callable[[NodeStatus], object] | None = None
    """The field's value from the node's answer; ``None`` for what the CLI fills in."""
    local: bool = False
    """Known only for a node of the local cluster directory (``kv cluster status``)."""
    in_table: bool = True
    cell: Callable[[Row], str] | None = None
    """The table cell; by default the field as text."""


def cell(row: Row, name: str) -> str:
    """A field as a table cell: blank when the node did not answer."""
    value = row.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _fsync(row: Row) -> str:
    """Durable mode, or a warning that it is off (acknowledged writes die with the power)."""
    if "fsync" not in row:
        return ""
    return "yes" if row["fsync"] else "NO (--no-fsync)"


def _errors(row: Row) -> str:
    """Why the node did not answer, else its alarms (etcdctl's ERRORS column)."""
    return cell(row, "error") or cell(row, "alarms")


def _tick_gaps(row: Row) -> str:
    """The longest gaps between two passes of the node's Raft loop, in ms: the last 10 s, and
    since the node started."""
    if row.get("tick_gap_ms") is None:
        return ""
    return f"{row['tick_gap_ms']:.0f}/{row['tick_gap_max_ms']:.0f}"


COLUMNS: tuple[Column, ...] = (
    Column("id", lambda s: s.node_id),
    Column("endpoint", lambda s: s.api_address),
    Column("pid", local=True),
    Column("alive", local=True, in_table=False),
    Column("role", lambda s: s.role),
    Column("fsync", lambda s: s.fsync, cell=_fsync),
    Column("leader", lambda s: s.leader_api_address, in_table=False),
    Column("term", lambda s: s.term),
    Column("commit", lambda s: s.commit_index),
    Column("applied", lambda s: s.applied_index),
    Column("lag", lambda s: s.lag),
    Column("sessions", lambda s: s.sessions),
    Column("keys", lambda s: s.keys),
    Column("digest", lambda s: s.digest),
    Column("has_quorum", lambda s: s.has_quorum, in_table=False),
    Column("membership_change_pending", lambda s: s.membership_change_pending, in_table=False),
    Column("snapshot", lambda s: list(s.snapshot)),
    Column("tick_gap_ms", lambda s: round(s.tick_gap_recent_ms, 1), cell=_tick_gaps),
    Column("tick_gap_max_ms", lambda s: round(s.tick_gap_max_ms, 1), in_table=False),
    Column("snapshots_written", lambda s: s.snapshots_written, in_table=False),
    Column("snapshots_loaded", lambda s: s.snapshots_loaded, in_table=False),
    Column("snapshot_write_seconds", lambda s: round(s.snapshot_write_seconds, 3),
           in_table=False),
    Column("snapshot_restore_seconds", lambda s: round(s.snapshot_restore_seconds, 3),
           in_table=False),
    Column("gc_pause_max_ms", lambda s: round(s.gc_pause_max_ms, 1), in_table=False),
    Column("alarms", lambda s: list(s.alarms), cell=_errors),
)


def flatten(status: NodeStatus) -> Row:
    """A node's answer as a row: every column that comes from the answer."""
    return {c.name: c.field(status) for c in COLUMNS if c.field is not None}


@dataclass(frozen=True)
class Target:
    """A node to ask: its endpoint, and what the local cluster directory knows of it."""

    endpoint: str
    node_id: str | None = None
    pid: int | None = None
    local: bool = False
    """A node of the local cluster: its process is known (``pid`` None: not running)."""


def probe(client: Client, target: Target, *, cluster_id: int | None = None,
          with_digest: bool = True, timeout: float | None = None) -> Row:
    """The target's row: its answer, or why there is none (never an exception, but for
    refused credentials: they are the command's failure, not a node's).

    With ``cluster_id``, a node answering for another cluster (a port reused since) is an
    error, not a row that looks fine.
    """
    row: Row = {"id": target.node_id, "endpoint": target.endpoint}
    if target.local:
        row |= {"pid": target.pid, "alive": target.pid is not None}
    started = time.monotonic()
    try:
        status = client.status(target.endpoint, with_digest=with_digest, timeout=timeout)
    except AccessDenied:
        raise
    except KVError as exc:
        row["error"] = NOT_RUNNING if target.local and target.pid is None else UNREACHABLE
        row["detail"] = str(exc)
        return row
    row["took_ms"] = round((time.monotonic() - started) * 1000, 1)
    if cluster_id is not None and status.cluster_id != cluster_id:
        row["error"] = f"another cluster answers here (id {status.cluster_id}, not {cluster_id})"
        return row
    return row | flatten(status)


def answered(row: Row) -> bool:
    return "error" not in row


def report(rows: Sequence[Row], *, local: bool) -> Report:
    """The rows in every output format, with the columns that apply."""
    columns = [c for c in COLUMNS if c.in_table and (local or not c.local)]
    names = [c.name for c in COLUMNS if local or not c.local]
    data = [{k: v for k, v in row.items() if k in names or k in ("error", "detail", "took_ms")}
            for row in rows]
    table_rows = [[(c.cell or (lambda r, n=c.name: cell(r, n)))(row) for c in columns]
                  for row in rows]
    return Report(data, [c.name for c in columns], table_rows)


def require_an_answer(rows: Sequence[Row], start_hint: str = "") -> None:
    """Exit 2 when no node answered: the rows were printed, but nothing is reachable.

    ``start_hint`` is how to start the nodes, said when none of them is running."""
    if not rows or any(answered(row) for row in rows):
        return
    if start_hint and all(row.get("error") == NOT_RUNNING for row in rows):
        raise CliError(f"no node is running (start them with '{start_hint}')", UNAVAILABLE)
    raise CliError(f"no node answered ({len(rows)} asked)", UNAVAILABLE)
