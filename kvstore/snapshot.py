"""The snapshot format: the whole replicated state as deterministic bytes.

Same state, same bytes, on every replica: sessions in LRU order (least recent first) with their
cached results in ascending series id, then the user data in ascending key order. Sorting the
data matters because a Python dict remembers insertion order, and a replica restored from a
snapshot inserted its keys in a different order from one that applied the log.

The format carries a version number so it can evolve: a reader refuses versions it does not
know rather than misread them. Version 2 adds, to each cached result, the digest of the command
that produced it (``kvstore.dedup``, rule 8b). Version 1 still restores: its results have no
digest and answer any retry of their series id, as they did when it was written, until the
client acknowledges them and they are dropped.

Which version is written: the oldest that holds the state, so 2 as soon as one cached result
has a digest, else 1. A store restored from a version-1 snapshot therefore encodes to the very
bytes it was restored from, which a node checks when it restarts from its snapshot file (the
state digest recorded in the file must match the restored state's). Replicas that restored
version-1 snapshots at different log positions may differ, for a while, in which of those old
results carry a digest: the ones re-applied after the upgrade do. That ends when the clients
acknowledge them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.dedup import COMMAND_DIGEST_SIZE
from kvstore.proto.log_pb2 import CachedResponse, KeyValue, SessionRecord, Snapshot
from kvstore.session_store import ClientSession, SessionStore
from session.wire import WireDecodeError, parse_canonical

FORMAT_VERSION = 2
"""The newest version: what this build writes once any cached result has a command digest."""
WITHOUT_DIGESTS_VERSION = 1
"""The version before command digests; written when no cached result has one."""


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this version can restore."""


@dataclass
class State:
    """Everything a snapshot holds, decoded."""

    cluster_id: int
    sessions: SessionStore
    data: dict[bytes, bytes]


def encode(state: State) -> bytes:
    snapshot = Snapshot(cluster_id=state.cluster_id, session_capacity=state.sessions.capacity)
    with_digests = False
    for client in state.sessions:
        with_digests = with_digests or bool(client.command_digests)
        snapshot.sessions.append(
            SessionRecord(
                client_id=client.client_id,
                responded_to=client.responded_to,
                responses=[
                    CachedResponse(
                        series_id=s,
                        result=client.responses[s],
                        command_digest=client.command_digests.get(s, b""),
                    )
                    for s in sorted(client.responses)
                ],
            )
        )
    snapshot.format_version = FORMAT_VERSION if with_digests else WITHOUT_DIGESTS_VERSION
    snapshot.data.extend(KeyValue(key=k, value=state.data[k]) for k in sorted(state.data))
    return snapshot.SerializeToString(deterministic=True)


def decode(data: bytes) -> State:
    """Decodes and validates a snapshot; raises ``SnapshotError``."""
    try:
        snapshot = parse_canonical(Snapshot, data)
    except WireDecodeError as exc:
        raise SnapshotError(str(exc)) from exc
    if snapshot.format_version not in (WITHOUT_DIGESTS_VERSION, FORMAT_VERSION):
        raise SnapshotError(
            f"snapshot format version {snapshot.format_version}, this build reads "
            f"{WITHOUT_DIGESTS_VERSION} and {FORMAT_VERSION}"
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
                    command_digests={
                        c.series_id: c.command_digest for c in r.responses if c.command_digest
                    },
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
    digests = 0
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
        for cached in record.responses:
            if cached.command_digest and len(cached.command_digest) != COMMAND_DIGEST_SIZE:
                raise SnapshotError(
                    f"session {record.client_id}: the command digest of series "
                    f"{cached.series_id} is {len(cached.command_digest)} bytes, not "
                    f"{COMMAND_DIGEST_SIZE}"
                )
            digests += bool(cached.command_digest)
    if snapshot.format_version == WITHOUT_DIGESTS_VERSION and digests:
        raise SnapshotError(f"a version-{WITHOUT_DIGESTS_VERSION} snapshot with command digests")
    if snapshot.format_version == FORMAT_VERSION and not digests:
        raise SnapshotError(
            f"a version-{FORMAT_VERSION} snapshot without command digests "
            f"(this build writes it as version {WITHOUT_DIGESTS_VERSION})"
        )
