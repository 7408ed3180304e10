"""One node's ``Status``, flattened for the output formats, or the error that replaced it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.errors import KVError

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.proto.api_pb2 import NodeStatus


def probe(client: Client, endpoint: str, *, timeout: float | None = None,
          with_digest: bool = False) -> dict[str, object]:
    """``endpoint``'s status as a flat dict; an unreachable node gives ``{"error": ...}``.

    A status report must show every node, so a node that does not answer is a row with its
    error, never an exception.
    """
    try:
        return flatten(client.status(endpoint, timeout=timeout, with_digest=with_digest))
    except KVError as exc:
        return {"endpoint": endpoint, "error": str(exc)}


def flatten(status: NodeStatus) -> dict[str, object]:
    return {
        "id": status.node_id,
        "endpoint": status.api_address,
        "role": status.role,
        "leader": status.leader_api_address,
        "term": status.term,
        "commit": status.commit_index,
        "applied": status.applied_index,
        "lag": status.lag,
        "sessions": status.sessions,
        "keys": status.keys,
        "digest": status.digest,
        "has_quorum": status.has_quorum,
        "alarms": list(status.alarms),
    }


def cell(row: dict[str, object], name: str) -> str:
    """A field as a table cell: blank when the node did not answer."""
    value = row.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
