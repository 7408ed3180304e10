"""The snapshot format: the whole replicated state as deterministic bytes.

Same state, same bytes, on every replica: sessions in LRU order (least recent first) with their
cached results in ascending series id, then the user data in ascending key order. Sorting the
data matters because a Python dict remembers insertion order, and a replica restored from a
snapshot inserted its keys in a different order from one that applied the log.

The format carries a version number so it can evolve: a reader refuses versions it does not
know rather than misread them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.proto.log_pb2 import CachedResponse, KeyValue, SessionRecord, Snapshot
from kvstore.session_store import ClientSession, SessionStore
from session.wire import WireDecodeError, parse_canonical

FORMAT_VERSION = 1


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this version can restore."""


@dataclass
class State:
    """Everything a snapshot holds, decoded."""

    cluster_id: int
    sessions: SessionStore
    data: dict[bytes, bytes]


def encode(state: State) -> bytes:
    snapshot = Snapshot(
        format_version=FORMAT_VERSION,
        cluster_id=state.cluster_id,
        session_capacity=state.sessions.capacity,
    )
    for client in state.sessions:
        snapshot.sessions.append(
            SessionRecord(
                client_id=client.client_id,
                responded_to=client.responded_to,
                responses=[
                    CachedResponse(series_id=s, result=client.responses[s])
                    for s in sorted(client.responses)
                ],
            )
        )
    snapshot.data.extend(KeyValue(key=k, value=state.data[k]) for k in sorted(state.data))
    return snapshot.SerializeToString(deterministic=True)


def decode(data: bytes) -> State:
    """Decodes and validates a snapshot; raises ``SnapshotError``."""
    try:
        snapshot = parse_canonical(Snapshot, data)
    except WireDecodeError as exc:
        raise SnapshotError(str(exc)) from exc
    if snapshot.format_version != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format version {snapshot.format_version}, this build reads {FORMAT_VERSION}"
        )
    _check_sessions(snapshot)
    try:
        sessions = SessionStore(snapshot.session_capacity)
        sessions.restore(
            [
                ClientSession(
                    client_id=r.client_id,
                    responded_to=r.responded_to,
                    responses={c.series_id: c.result for c in r.responses},
                )
                for r in snapshot.sessions
            ]
        )
    except ValueError as exc:
        raise SnapshotError(f"invalid session store in snapshot: {exc}") from exc
    user_data = {kv.key: kv.value for kv in snapshot.data}
    if len(user_data) != len(snapshot.data):
        raise SnapshotError("duplicate key in snapshot")
    return State(cluster_id=snapshot.cluster_id, sessions=sessions, data=user_data)


def _check_sessions(snapshot: Snapshot) -> None:
    """Refuses session records our encoder never writes, so a restore is exact: re-encoding
    the restored state gives back the same bytes."""
    for record in snapshot.sessions:
        if record.client_id == 0:
            raise SnapshotError("a session with the reserved client id 0")
        series = [c.series_id for c in record.responses]
        if series != sorted(set(series)):
            raise SnapshotError(f"session {record.client_id}: cached series ids not strictly ascending")
        if series and series[0] <= record.responded_to:
            raise SnapshotError(
                f"session {record.client_id}: cached series {series[0]} already acknowledged"
            )
