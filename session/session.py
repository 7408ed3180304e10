"""The client session: who is proposing, and how far its proposals have got.

Raft alone gives at-least-once semantics: a client whose proposal timed out cannot tell
whether it was committed, and retrying it may apply it twice. Section 6.3 of Ongaro's thesis
fixes this with a session per client. Every proposal carries

* ``client_id``: a random 64-bit id, the same for all of the client's proposals;
* ``series_id``: the number of this proposal; a retry reuses it, a new proposal takes the next;
* ``responded_to``: the highest series id whose answer the client has received, so the
  cluster can forget cached answers up to it.

The replicated state machine keeps, per session, the results of proposals it applied; a
proposal whose series id it has already applied is answered from that cache and not applied
again (see ``kvstore.dedup``). The client's side of the bargain is in this class:

1. ``new_session`` picks a client id; ``prepare_for_register`` and a proposal of that session
   register it with the cluster.
2. ``prepare_for_propose`` sets the first series id.
3. After each proposal that *completed* (an answer arrived), ``proposal_completed`` advances
   the series. After a timeout it is *not* called: the retry reuses the series id.
4. ``prepare_for_unregister`` and one more proposal close the session.

A session allows one outstanding proposal at a time; concurrency comes from several sessions.
A no-op session (series id 0) opts out: each proposal is applied every time it is received.

The API mirrors dragonboat's Go ``client.Session`` with Python names.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

from session import session_pb2
from session.constants import (
    NOOP_SERIES_ID,
    NOT_SESSION_MANAGED_CLIENT_ID,
    SERIES_ID_FIRST_PROPOSAL,
    SERIES_ID_FOR_REGISTER,
    SERIES_ID_FOR_UNREGISTER,
    UINT64_MAX,
)
from session.errors import (
    ClusterMismatchError,
    SessionDecodeError,
    SessionInvariantError,
    SessionStateError,
    SessionValueError,
)
from session.wire import WireDecodeError, decode_varint_fields

_FIELDS = ("cluster_id", "client_id", "series_id", "responded_to")
_SESSION_OPS = (SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER)


class RandomSource(Protocol):
    """What ``new_session`` needs from an injected rng (``random.Random`` fits)."""

    def getrandbits(self, k: int, /) -> int: ...


@dataclass(eq=True)
class Session:
    """One client's identity and progress; all four fields are uint64."""

    cluster_id: int = 0
    client_id: int = 0
    series_id: int = 0
    responded_to: int = 0

    def __post_init__(self) -> None:
        for name in _FIELDS:
            _check_uint64(name, getattr(self, name))

    # -- protocol steps ---------------------------------------------------------------------

    def prepare_for_register(self) -> None:
        """Makes the next proposal of this session the request that registers it."""
        self.series_id = SERIES_ID_FOR_REGISTER

    def prepare_for_unregister(self) -> None:
        """Makes the next proposal of this session the request that unregisters it."""
        self.series_id = SERIES_ID_FOR_UNREGISTER

    def prepare_for_propose(self) -> None:
        """Sets the first series id, once, after the session was registered.

        Raises ``SessionStateError`` on a session that has already completed proposals or is a
        no-op session: restarting the series would reuse ids the cluster has answered.
        """
        if self.is_noop_session():
            raise SessionStateError("a no-op session has no series to prepare")
        if self.responded_to != 0:
            raise SessionStateError(
                f"prepare_for_propose() on a session that has completed proposals up to "
                f"{self.responded_to}; it is called once, right after registering"
            )
        self.series_id = SERIES_ID_FIRST_PROPOSAL

    def proposal_completed(self) -> None:
        """Records that the current proposal got its answer and moves to the next series id.

        Called after every proposal that completed, whatever its result, and never after a
        timeout (the retry must reuse the series id). The cluster learns through
        ``responded_to`` that it may drop the cached answer.
        """
        if self.is_noop_session():
            raise SessionStateError("proposal_completed() on a no-op session")
        if self.series_id in _SESSION_OPS:
            raise SessionStateError("proposal_completed() after a register or unregister request")
        if self.series_id != self.responded_to + 1:
            raise SessionStateError(
                f"proposal_completed() out of order: series_id {self.series_id} is not "
                f"responded_to {self.responded_to} + 1"
            )
        self.responded_to = self.series_id
        self.series_id += 1

    # -- checks -----------------------------------------------------------------------------

    def valid_for_proposal(self, cluster_id: int) -> bool:
        """Whether this session may propose a command to cluster ``cluster_id``.

        False for another cluster, the reserved client id, and a session prepared for
        register or unregister. ``responded_to > series_id`` is a broken invariant, not a
        wrong state, and raises ``SessionInvariantError``.
        """
        if self.cluster_id != cluster_id or self.client_id == NOT_SESSION_MANAGED_CLIENT_ID:
            return False
        if self.series_id in _SESSION_OPS:
            return False
        if self.responded_to > self.series_id:
            raise SessionInvariantError(
                f"responded_to {self.responded_to} is past series_id {self.series_id}"
            )
        return True

    def valid_for_session_op(self, cluster_id: int) -> bool:
        """Whether this session is prepared to register or unregister with ``cluster_id``."""
        return (
            self.cluster_id == cluster_id
            and self.client_id != NOT_SESSION_MANAGED_CLIENT_ID
            and self.series_id in _SESSION_OPS
        )

    def cluster_id_must_match(self, cluster_id: int) -> None:
        """Raises ``ClusterMismatchError`` unless the session belongs to ``cluster_id``."""
        if self.cluster_id != cluster_id:
            raise ClusterMismatchError(
                f"session belongs to cluster {self.cluster_id}, not {cluster_id}"
            )

    def is_noop_session(self) -> bool:
        """Whether this session opts out of deduplication (series id 0)."""
        return self.series_id == NOOP_SERIES_ID

    # -- encoding ---------------------------------------------------------------------------

    def marshal(self) -> bytes:
        """Protobuf bytes, identical to dragonboat's: all four fields, zeros included."""
        return self.to_pb().SerializeToString()

    def to_pb(self) -> session_pb2.SessionPB:
        """The session as its protobuf message, every field explicitly present."""
        return session_pb2.SessionPB(**{name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_pb(cls, pb: session_pb2.SessionPB) -> Session:
        """The session in a protobuf message (absent fields are 0)."""
        return cls(**{name: getattr(pb, name) for name in _FIELDS})

    def unmarshal(self, data: bytes) -> None:
        """Replaces this session's fields with the ones encoded in ``data``.

        Accepts any valid encoding: fields in any order, omitted zeros, repeated fields (the
        last wins), padded varints, unknown fields. Raises ``SessionDecodeError`` for bytes that
        do not decode or that carry one of the four fields with the wrong wire type. Decoded by
        hand (``session.wire.decode_varint_fields``), so every protobuf backend agrees.
        """
        try:
            fields = decode_varint_fields(data, known=range(1, len(_FIELDS) + 1))
        except WireDecodeError as exc:
            raise SessionDecodeError(f"not a valid session: {exc}") from exc
        values = {name: fields.get(number, 0) for number, name in enumerate(_FIELDS, start=1)}
        for name, value in values.items():
            setattr(self, name, value)

    def size(self) -> int:
        """Length in bytes of ``marshal()``."""
        return len(self.marshal())

    def reset(self) -> None:
        """Sets every field to zero."""
        for name in _FIELDS:
            setattr(self, name, 0)

    def __str__(self) -> str:
        return (
            f"cluster_id:{self.cluster_id} client_id:{self.client_id} "
            f"series_id:{self.series_id} responded_to:{self.responded_to}"
        )


def new_session(cluster_id: int, rng: RandomSource | None = None) -> Session:
    """A session for ``cluster_id`` with a fresh random client id, not yet registered.

    Its series id starts at ``NOOP_SERIES_ID + 1`` so that it is never mistaken for a no-op
    session, even before ``prepare_for_register``.

    The id comes from the operating system's cryptographic source unless ``rng`` is given
    (tests inject a seeded one). Two clients that drew the same id would share a session and
    answer each other's retries, so the id must be unpredictable, not merely unique per process.
    """
    return Session(
        cluster_id=cluster_id, client_id=_random_client_id(rng), series_id=NOOP_SERIES_ID + 1
    )


def new_noop_session(cluster_id: int, rng: RandomSource | None = None) -> Session:
    """A session that opts out of deduplication: series id 0, applied every time."""
    return Session(
        cluster_id=cluster_id, client_id=_random_client_id(rng), series_id=NOOP_SERIES_ID
    )


def _random_client_id(rng: RandomSource | None) -> int:
    draw = rng.getrandbits if rng is not None else secrets.randbits
    while True:
        client_id = draw(64)
        if client_id != NOT_SESSION_MANAGED_CLIENT_ID:
            return client_id


def _check_uint64(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise SessionValueError(f"{name} must be an integer in [0, 2**64-1], got {value!r}")
