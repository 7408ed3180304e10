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

**Why it is written and read in pieces.** A node takes and installs snapshots of millions of keys
while its Raft thread must keep ticking (issue 9: never 100 ms without a pass). Python lets a
thread run in the background only between bytecodes, and a single C call (``sorted`` of 1M keys
in random order: 0.7-1 s; protobuf's ``SerializeToString`` of a 113 MiB message; its parse)
holds the lock the whole time. So the encoder works on a ``Frozen`` copy of the state (taken on
the Raft thread between two applies: a ``dict.copy`` of the data, about 30 ms at 1M keys) and is
a generator of small pieces: the keys are sorted in runs of ``SORT_RUN`` and merged, and each
piece of output holds ``PIECE_ENTRIES`` entries. The decoder is a generator too.

The pieces concatenate to exactly what ``Snapshot.SerializeToString(deterministic=True)`` gives
for the whole message (protobuf writes fields in field-number order and a repeated field as one
record per element, so the header fields, then each session, then each key-value can be written
separately). The key-value records are written and read by hand (``_put_record`` and
``_data_records``): protobuf's Python objects cost about 2 us per record and allocate enough to
set off collections of 100+ ms, while these 30 lines run at about 0.7 us and are tested to give
protobuf's bytes (``tests/unit/test_snapshot_stream.py``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass

from kvstore.data import Data, FrozenData
from kvstore.dedup import COMMAND_DIGEST_SIZE
from kvstore.proto.log_pb2 import CachedResponse, SessionRecord, Snapshot
from kvstore.session_store import ClientSession, SessionStore
from session.wire import WireDecodeError, parse_canonical

FORMAT_VERSION = 2
"""The newest version: what this build writes once any cached result has a command digest."""
WITHOUT_DIGESTS_VERSION = 1
"""The version before command digests; written when no cached result has one."""

SORT_RUN = 8192
"""Keys sorted by one ``sorted`` call (about 5 ms for keys in random order)."""
PIECE_ENTRIES = 4096
"""Records per piece of output or per decoding step (about 3 ms of work)."""
SESSION_PIECE = 256
"""Session records per piece."""

_DATA_TAG = 0x2A  # field 5 (Snapshot.data), length-delimited
_KEY_TAG = 0x0A  # KeyValue.key: field 1, length-delimited
_VALUE_TAG = 0x12  # KeyValue.value: field 2, length-delimited


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this version can restore."""


@dataclass
class State:
    """Everything a snapshot holds, decoded."""

    cluster_id: int
    sessions: SessionStore
    data: Mapping[bytes, bytes]
    """A ``kvstore.data.Data`` (what ``decode`` returns), or any mapping."""


@dataclass(frozen=True)
class Frozen:
    """The state at one applied index, detached from the live state, ready to be encoded on
    another thread while applies go on: the data frozen copy-on-write (``kvstore.data``), the
    sessions (few, and mutable) copied one by one."""

    cluster_id: int
    session_capacity: int
    sessions: tuple[ClientSession, ...]
    data: FrozenData


def freeze(state: State) -> Frozen:
    """What a snapshot needs, detached: O(shards) for the data, O(sessions) for the sessions."""
    sessions = tuple(ClientSession(s.client_id, s.responded_to, dict(s.responses),
                                   dict(s.command_digests))
                     for s in state.sessions)  # (dataclasses.replace: twice as slow)
    return Frozen(state.cluster_id, state.sessions.capacity, sessions,
                  FrozenData.copy_of(state.data))


def encode(state: State) -> bytes:
    return b"".join(encode_pieces(freeze(state)))


def encode_pieces(frozen: Frozen) -> Iterator[bytes]:
    """The snapshot of ``frozen`` in pieces of bounded work; some pieces are empty (a pause
    between two sort runs). Joined, they are the canonical encoding of the ``Snapshot``."""
    with_digests = any(client.command_digests for client in frozen.sessions)
    header = Snapshot(format_version=FORMAT_VERSION if with_digests else WITHOUT_DIGESTS_VERSION,
                      cluster_id=frozen.cluster_id, session_capacity=frozen.session_capacity)
    yield header.SerializeToString(deterministic=True)
    sessions = frozen.sessions
    for start in range(0, len(sessions), SESSION_PIECE):
        piece = Snapshot(sessions=[_session_record(c) for c in sessions[start:start + SESSION_PIECE]])
        yield piece.SerializeToString(deterministic=True)
    shards, mask = frozen.data.shards, frozen.data.mask
    keys = yield from _sorted_keys(frozen.data)
    varints, small = _VARINTS, len(_VARINTS)
    out = bytearray()
    count = 0
    for key in keys:
        value = shards[hash(key) & mask][key]  # frozen.data[key], inlined
        key_len, value_len = len(key), len(value)
        if 0 < key_len < small and 0 < value_len < small:  # _put_record, inlined: 3x faster
            key_size, value_size = varints[key_len], varints[value_len]
            out += b"\x2a"
            out += _varint(2 + len(key_size) + key_len + len(value_size) + value_len)
            out += b"\x0a"
            out += key_size
            out += key
            out += b"\x12"
            out += value_size
            out += value
        else:
            _put_record(out, key, value)
        count += 1
        if count == PIECE_ENTRIES:
            yield bytes(out)
            out.clear()
            count = 0
    yield bytes(out)


def _session_record(client: ClientSession) -> SessionRecord:
    return SessionRecord(
        client_id=client.client_id,
        responded_to=client.responded_to,
        responses=[
            CachedResponse(series_id=s, result=client.responses[s],
                           command_digest=client.command_digests.get(s, b""))
            for s in sorted(client.responses)
        ],
    )


def _sorted_keys(data: Mapping[bytes, bytes]) -> Generator[bytes, None, Iterator[bytes]]:
    """Sorts in runs of ``SORT_RUN`` keys, yielding (empty pieces) between runs; returns the
    merged order. ``heapq.merge`` is a Python generator, so the merge pauses between keys.

    Each run is kept as the keys of a dict (in sorted order: a dict keeps insertion order), not
    as a list: a dict holding only bytes is not tracked by the garbage collector, and a list
    is. Kept as lists, the runs are a million references that every collection of the young
    generations visits while they are young, reading each key's header (a cache miss each): a
    single collection held the interpreter for 50-95 ms at 1M keys, whichever thread set it
    off (``benchmarks/gil_holds.py``)."""
    keys = iter(data)
    runs = []
    while run := sorted(itertools.islice(keys, SORT_RUN)):
        runs.append(dict.fromkeys(run))
        del run  # the list goes now, before a collection can find it
        yield b""
    # The merge holds iterators only: a dict's iterator lets go of it when exhausted, so each
    # run is freed as the merge finishes it, not all at once at the end (1M keys touched).
    return iter(runs[0]) if len(runs) == 1 else heapq.merge(*[iter(run) for run in runs])


def _varint(n: int) -> bytes:
    return _VARINTS[n] if n < len(_VARINTS) else _encode_varint(n)


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [_encode_varint(n) for n in range(1 << 14)]
"""Every varint below 16 KiB, precomputed: key lengths, and the value lengths of most values."""


def _put_record(out: bytearray, key: bytes, value: bytes) -> None:
    """Appends the ``Snapshot.data`` record of one key as protobuf writes it: a length-delimited
    ``KeyValue`` whose empty fields are left out. ``bytearray +=`` is the cheapest way CPython
    has to build it."""
    key_size = _varint(len(key)) if key else b""
    value_size = _varint(len(value)) if value else b""
    inner = ((1 + len(key_size) + len(key) if key else 0)
             + (1 + len(value_size) + len(value) if value else 0))
    out += b"\x2a"
    out += _varint(inner)
    if key:
        out += b"\x0a"
        out += key_size
        out += key
    if value:
        out += b"\x12"
        out += value_size
        out += value


def decode(data: bytes) -> State:
    """Decodes and validates a snapshot; raises ``SnapshotError``."""
    steps = decode_steps(data)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def decode_steps(data: bytes) -> Generator[None, None, State]:
    """``decode`` as a generator that pauses every ``PIECE_ENTRIES`` records; its return value
    is the ``State``. It accepts exactly the bytes ``encode`` writes for some valid state (so a
    restored state encodes back to the same bytes) and raises ``SnapshotError`` for anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"expected bytes, got {type(data).__name__}")
    buf = bytes(data)
    data_start = _find_data(buf)
    try:
        snapshot = parse_canonical(Snapshot, buf[:data_start])
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
    yield
    user_data = yield from _data_records(buf, data_start)
    return State(cluster_id=snapshot.cluster_id, sessions=sessions, data=user_data)


def _find_data(buf: bytes) -> int:
    """Where the first ``data`` record starts. Before it, our encoding has only the header's
    varint fields and session records; at anything else the scan stops and the whole input
    goes to ``parse_canonical``, which refuses it with its usual words (an input that is
    canonical has nothing else)."""
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        if tag == _DATA_TAG:
            return pos
        try:
            if tag in (0x08, 0x10, 0x18):  # fields 1-3, varints
                _, pos = _read_varint(buf, pos + 1, end)
            elif tag == 0x22:  # field 4, a session record
                length, pos = _read_varint(buf, pos + 1, end)
                pos += length
            else:
                return end
        except SnapshotError:
            return end
    return end


def _data_records(buf: bytes, pos: int) -> Generator[None, None, Data]:
    """The key-value records from ``pos`` to the end, which must be canonical ``KeyValue``
    records in strictly ascending key order (what ``_put_record`` writes for sorted keys).
    One-byte varints are read inline (3x faster); ``_read_varint`` does the rest."""
    end = len(buf)
    data = Data()
    shards, mask = data.loader(), len(data.loader()) - 1
    previous: bytes | None = None
    count = 0
    while pos < end:
        if buf[pos] != _DATA_TAG:
            raise SnapshotError("not the canonical encoding of a Snapshot")  # data come last
        pos += 1
        length = buf[pos] if pos < end else 0x80
        if length < 0x80:
            pos += 1
        else:
            length, pos = _read_varint(buf, pos, end)
        stop = pos + length
        if stop > end:
            raise SnapshotError("not the canonical encoding of a Snapshot: truncated record")
        if (pos + 1 < stop and buf[pos] == _KEY_TAG and 0 < (n := buf[pos + 1]) < 0x80
                and pos + n + 3 < stop and buf[pos + n + 2] == _VALUE_TAG
                and 0 < (m := buf[pos + n + 3]) < 0x80):
            # The usual record, both lengths under 128, read inline: 3x faster.
            key = buf[pos + 2:pos + 2 + n]
            pos += n + 4
            value = buf[pos:pos + m]
            pos += m
        else:
            key = value = b""
            if pos < stop and buf[pos] == _KEY_TAG:
                key, pos = _field(buf, pos + 1, stop)
            if pos < stop and buf[pos] == _VALUE_TAG:
                value, pos = _field(buf, pos + 1, stop)
        if pos != stop:
            raise SnapshotError("not the canonical encoding of a KeyValue")
        if previous is not None and key <= previous:
            seen = key in shards[hash(key) & mask]
            raise SnapshotError("duplicate key in snapshot" if seen
                                else "keys out of order in snapshot")
        shards[hash(key) & mask][key] = value  # data[key] = value, inlined
        previous = key
        count += 1
        if count == PIECE_ENTRIES:
            count = 0
            yield
    return data


def _field(buf: bytes, pos: int, stop: int) -> tuple[bytes, int]:
    """A non-empty length-delimited field's bytes (protobuf leaves empty ones out)."""
    length = buf[pos] if pos < stop else 0x80
    if length < 0x80:
        pos += 1
    else:
        length, pos = _read_varint(buf, pos, stop)
    if length == 0 or pos + length > stop:
        raise SnapshotError("not the canonical encoding of a KeyValue")
    return buf[pos:pos + length], pos + length


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A canonical varint (no padding) of at most 64 bits at ``pos``, and the position after it."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if (byte == 0 and shift) or value >> 64:
                break
            return value, pos
        shift += 7
    raise SnapshotError("not the canonical encoding of a Snapshot: bad varint")


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
