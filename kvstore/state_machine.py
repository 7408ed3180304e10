"""The replicated state machine: ``apply(entry) -> result``, and nothing else that moves.

Every replica runs the same entries through ``apply`` in the same order and must end with the
same bytes. So ``apply`` is a pure function of (state, entry): no clock, no randomness, no I/O,
no dependence on which node runs it, and it never raises. A bad entry becomes an error result
that every replica computes alike (PySyncObj wedges a node whose apply raises: defect D5).
Threads, sockets and the Raft library live in ``kvstore.node``, outside this module.
"""

from __future__ import annotations

import hashlib

from kvstore import commands, dedup, results, snapshot
from kvstore.data import Data
from kvstore.entry import decode_batch, decode_entry
from kvstore.limits import DEFAULT_SESSION_CAPACITY
from kvstore.proto.log_pb2 import Code, Command, Result
from kvstore.session_store import SessionStore
from session.wire import WireDecodeError

DIGEST_HEX_CHARS = 16


class StateMachine:
    """User data plus the session store of one cluster."""

    def __init__(self, cluster_id: int, session_capacity: int = DEFAULT_SESSION_CAPACITY) -> None:
        self.cluster_id = cluster_id
        self.sessions = SessionStore(session_capacity)
        self.data: commands.Data = Data()

    def apply(self, entry: bytes) -> bytes:
        """Applies one committed log entry and returns the serialized ``Result``."""
        try:
            decoded = decode_entry(entry)
        except WireDecodeError:
            # A fixed message: the decoder's own words differ between protobuf backends, and
            # every replica must return the same bytes.
            return results.encode(
                results.error(Code.MALFORMED_ENTRY, "not the canonical encoding of an Entry")
            )
        if not decoded.HasField("session"):
            return results.encode(results.error(Code.MALFORMED_ENTRY, "the entry has no session"))
        if decoded.session.cluster_id != self.cluster_id:
            return results.encode(
                results.error(
                    Code.CLUSTER_MISMATCH,
                    f"entry for cluster {decoded.session.cluster_id}, this is {self.cluster_id}",
                )
            )
        return dedup.apply_with_session(
            self.sessions,
            decoded.session,
            entry,
            lambda: results.encode(commands.execute(self.data, decoded.command)),
        )

    def apply_batch(self, batch: bytes) -> list[bytes]:
        """Applies every entry of a batch (``kvstore.entry.encode_batch``), in order.

        A batch that does not decode yields no results: every replica decodes the same bytes
        the same way, so they all skip it alike, and its proposers learn nothing (outcome
        unknown). Our own node never writes such a batch.
        """
        try:
            entries = decode_batch(batch)
        except WireDecodeError:
            return []
        return [self.apply(entry) for entry in entries]

    def query(self, command: Command) -> Result:
        """Answers a read-only command from local state, outside the log (a serializable read).

        It touches no session: reads must not change the LRU order, or replicas would part.
        """
        if not commands.is_read_only(command):
            return results.error(Code.INVALID_ARGUMENT, "only get and range can be read locally")
        return commands.execute(self.data, command)

    def snapshot(self) -> bytes:
        """The whole state as deterministic bytes (see ``kvstore.snapshot``)."""
        return snapshot.encode(self._state())

    def freeze(self) -> snapshot.Frozen:
        """A copy of the state as of now, to encode on another thread while applies go on
        (``snapshot.encode_pieces``); it costs a ``dict.copy`` of the data."""
        return snapshot.freeze(self._state())

    def restore(self, data: bytes) -> None:
        """Replaces the state with a snapshot's; raises ``SnapshotError`` and changes nothing
        if the bytes are not a valid snapshot of this cluster."""
        self.install(snapshot.decode(data))

    def install(self, state: snapshot.State) -> snapshot.State:
        """Replaces the state with a decoded snapshot's (``snapshot.decode_steps``); returns
        the state replaced, for the caller to let go of where it costs nothing
        (``kvstore.node.snapshotter``: 1M keys take tens of milliseconds to free)."""
        if state.cluster_id != self.cluster_id:
            raise snapshot.SnapshotError(
                f"snapshot of cluster {state.cluster_id}, this is {self.cluster_id}"
            )
        replaced = self._state()
        state.sessions.counts = self.sessions.counts  # this replica's own, not the snapshot's
        self.sessions, self.data = state.sessions, state.data
        return replaced

    def digest(self) -> str:
        """A short hash of the whole state, for comparing replicas."""
        return hashlib.sha256(self.snapshot()).hexdigest()[:DIGEST_HEX_CHARS]

    def _state(self) -> snapshot.State:
        return snapshot.State(self.cluster_id, self.sessions, self.data)
