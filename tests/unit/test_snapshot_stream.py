"""The snapshot written and read in pieces (``kvstore.snapshot``) is the snapshot of before.

The reference here is what the snapshot was before it moved off the Raft thread: one protobuf
``Snapshot`` message built whole and serialized deterministically, and parsed whole with
``parse_canonical``. The pieces must join to exactly those bytes (so the digest is the same on
every replica, old or new), and the piecewise decoder must accept exactly what that reference
accepts (for sorted keys, which is all our encoder ever writes) and decode it to the same state.
"""

from __future__ import annotations

import gc
import hashlib
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import StateMachine, encode_entry, ops, snapshot
from kvstore.proto.log_pb2 import CachedResponse, KeyValue, SessionRecord, Snapshot
from kvstore.session_store import ClientSession, SessionStore
from session import new_noop_session
from session.wire import WireDecodeError, parse_canonical
from tests.support import under_mutmut

CLUSTER = 9


def reference_encode(state: snapshot.State) -> bytes:
    """The snapshot as it was built before: one message, serialized at once."""
    with_digests = any(client.command_digests for client in state.sessions)
    message = Snapshot(format_version=snapshot.FORMAT_VERSION if with_digests
                       else snapshot.WITHOUT_DIGESTS_VERSION,
                       cluster_id=state.cluster_id, session_capacity=state.sessions.capacity)
    for client in state.sessions:
        message.sessions.append(SessionRecord(
            client_id=client.client_id, responded_to=client.responded_to,
            responses=[CachedResponse(series_id=s, result=client.responses[s],
                                      command_digest=client.command_digests.get(s, b""))
                       for s in sorted(client.responses)]))
    message.data.extend(KeyValue(key=k, value=state.data[k]) for k in sorted(state.data))
    return message.SerializeToString(deterministic=True)


def reference_accepts(data: bytes) -> bool:
    """What the whole-message decoder accepted, restricted to keys in ascending order."""
    try:
        message = parse_canonical(Snapshot, data)
    except WireDecodeError:
        return False
    keys = [kv.key for kv in message.data]
    if keys != sorted(set(keys)) or message.format_version not in (
            snapshot.WITHOUT_DIGESTS_VERSION, snapshot.FORMAT_VERSION):
        return False
    try:
        snapshot._check_sessions(message)
        SessionStore(message.session_capacity).restore(
            [ClientSession(r.client_id) for r in message.sessions])
    except ValueError:  # SnapshotError is one
        return False
    return True


keys = st.one_of(st.binary(min_size=1, max_size=12), st.binary(min_size=130, max_size=300))
values = st.one_of(st.binary(max_size=12), st.binary(min_size=120, max_size=300),
                   st.just(b"x" * (1 << 14)))  # past the varint table: the general path


@st.composite
def states(draw: st.DrawFn) -> snapshot.State:
    data = draw(st.dictionaries(keys, values, max_size=40))
    capacity = draw(st.integers(1, 8))
    store = SessionStore(capacity)
    ids = draw(st.lists(st.integers(1, 2**64 - 1), unique=True, max_size=capacity))
    sessions = []
    for client_id in ids:
        responded_to = draw(st.integers(0, 50))
        series = draw(st.lists(st.integers(responded_to + 1, responded_to + 60), unique=True,
                               max_size=3))
        digests = draw(st.booleans())
        sessions.append(ClientSession(
            client_id, responded_to, {s: draw(st.binary(max_size=20)) for s in series},
            {s: draw(st.binary(min_size=8, max_size=8)) for s in series} if digests else {}))
    store.restore(sessions)
    return snapshot.State(CLUSTER, store, data)


@pytest.fixture
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces and sort runs of a few records, so small states exercise the merge and the steps."""
    monkeypatch.setattr(snapshot, "SORT_RUN", 3)
    monkeypatch.setattr(snapshot, "PIECE_ENTRIES", 2)
    monkeypatch.setattr(snapshot, "SESSION_PIECE", 2)


@settings(max_examples=300)
@given(states())
def test_the_pieces_join_to_the_bytes_of_the_whole_message(state: snapshot.State) -> None:
    assert snapshot.encode(state) == reference_encode(state)


@settings(max_examples=200)
@given(states())
def test_pieces_of_any_size_give_the_same_bytes(state: snapshot.State) -> None:
    whole = snapshot.encode(state)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snapshot, "SORT_RUN", 2)
        patch.setattr(snapshot, "PIECE_ENTRIES", 1)
        patch.setattr(snapshot, "SESSION_PIECE", 1)
        assert b"".join(snapshot.encode_pieces(snapshot.freeze(state))) == whole


@settings(max_examples=300)
@given(states())
def test_decoding_gives_back_the_state(state: snapshot.State) -> None:
    decoded = snapshot.decode(reference_encode(state))
    assert decoded.data == state.data
    assert snapshot.encode(decoded) == reference_encode(state)


def test_the_digest_is_the_digest_of_the_old_bytes() -> None:
    sm = StateMachine(CLUSTER)
    for n in range(500):
        sm.apply(encode_entry(new_noop_session(CLUSTER), ops.put(b"k%d" % (n * 7919 % 500), b"v")))
    old = reference_encode(snapshot.State(CLUSTER, sm.sessions, sm.data))
    assert sm.digest() == hashlib.sha256(old).hexdigest()[:16]


def test_a_frozen_state_is_the_state_at_the_moment_it_was_frozen() -> None:
    """Applies after the freeze (a put, a new session, a cached result) do not reach it."""
    sm = StateMachine(CLUSTER, session_capacity=4)
    noop = new_noop_session(CLUSTER)
    sm.apply(encode_entry(noop, ops.put(b"a", b"1")))
    from session import Session
    s = Session(CLUSTER, 77, series_id=2**64 - 2)
    sm.apply(encode_entry(s))
    before = sm.snapshot()
    frozen = sm.freeze()
    sm.apply(encode_entry(noop, ops.put(b"a", b"2")))
    sm.apply(encode_entry(noop, ops.put(b"b", b"3")))
    sm.apply(encode_entry(Session(CLUSTER, 77, series_id=1), ops.incr(b"n")))
    sm.apply(encode_entry(Session(CLUSTER, 88, series_id=2**64 - 2)))
    assert b"".join(snapshot.encode_pieces(frozen)) == before != sm.snapshot()


def test_freeze_copies_every_field_of_a_session() -> None:
    """A field added to ``ClientSession`` must be copied by ``freeze`` too (and encoded)."""
    from dataclasses import fields
    store = SessionStore(2)
    store.register(5)
    original = store.peek(5)
    assert original is not None
    original.record(3, b"r", b"d" * 8)
    copy = snapshot.freeze(snapshot.State(CLUSTER, store, {})).sessions[0]
    assert copy == original and copy.responses is not original.responses
    assert copy.command_digests is not original.command_digests
    assert [f.name for f in fields(ClientSession)] == ["client_id", "responded_to", "responses",
                                                       "command_digests"]


def test_keys_in_random_order_are_sorted_across_runs(tiny_pieces: None) -> None:
    rng = random.Random(4)
    data = {rng.randbytes(6): rng.randbytes(3) for _ in range(200)}
    state = snapshot.State(CLUSTER, SessionStore(1), data)
    pieces = list(snapshot.encode_pieces(snapshot.freeze(state)))
    assert b"".join(pieces) == reference_encode(state)
    assert len(pieces) > 100, "the work comes in small pieces"


def test_decoding_pauses_between_steps(tiny_pieces: None) -> None:
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k%03d" % n: b"v" for n in range(20)})
    steps = snapshot.decode_steps(reference_encode(state))
    pauses = 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            assert done.value.data == state.data
            break
    assert pauses >= 10


def _mutations(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1 and data:
        del data[rng.randrange(len(data)):]
    elif kind == 2:
        data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
    elif kind == 3 and len(data) > 2:
        i = rng.randrange(len(data) - 1)
        data[i], data[i + 1] = data[i + 1], data[i]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
    return bytes(data)


HOSTILE_INPUTS = 300 if under_mutmut() else 3000
"""Under mutmut, where every call of the decoder's functions goes through mutmut's trampoline
(10x slower), a tenth of them, always the same ones (the seed is fixed)."""


def test_the_piecewise_decoder_accepts_exactly_what_the_reference_accepts() -> None:
    """Hostile bytes: mutations of valid snapshots, including ones that break the data records
    (padded varints, a value field before the key, unknown fields, empty fields written out)."""
    rng = random.Random(11)
    sm = StateMachine(CLUSTER, session_capacity=3)
    from session import Session
    for client_id in (3, 1):
        sm.apply(encode_entry(Session(CLUSTER, client_id, series_id=2**64 - 2)))
        sm.apply(encode_entry(Session(CLUSTER, client_id, series_id=1), ops.incr(b"n")))
    for key in (b"a", b"bb", b"c" * 200):
        sm.apply(encode_entry(new_noop_session(CLUSTER), ops.put(key, key * 2)))
    sm.data[b"empty"] = b""
    valid = [sm.snapshot(), StateMachine(CLUSTER).snapshot()]
    handmade = [
        valid[0] + b"\x2a\x03\x0a\x01\xff",  # a last key: accepted
        valid[0] + b"\x2a\x03\x0a\x01\x00",  # a key out of order: refused
        valid[0] + b"\x2a\x05\x0a\x81\x00\x01z",  # a padded varint: refused
        valid[0] + b"\x2a\x06\x12\x01v\x0a\x01z",  # value before key: refused
        valid[0] + b"\x2a\x05\x0a\x01z\x12\x00",  # an empty value written out: refused
        valid[0] + b"\x2a\x05\x0a\x01z\x18\x01",  # an unknown field: refused
        valid[0] + b"\x2a\x00",  # a record with no key, after others: refused (order)
    ]
    inputs = handmade + [_mutations(rng, rng.choice(valid)) for _ in range(HOSTILE_INPUTS)]
    for data in inputs:
        expected = reference_accepts(data)
        try:
            decoded = snapshot.decode(data)
        except snapshot.SnapshotError:
            assert not expected, f"refused what the reference accepts: {data.hex()}"
            continue
        assert expected, f"accepted what the reference refuses: {data.hex()}"
        assert snapshot.encode(decoded) == data, "an accepted snapshot re-encodes to its bytes"


def test_non_bytes_are_refused() -> None:
    with pytest.raises(snapshot.SnapshotError, match="^expected bytes, got int$"):
        snapshot.decode(5)  # type: ignore[arg-type]


# -- the piecewise decoder's edges, one rule a test (found by mutation testing) -----------------

def empty_snapshot() -> bytes:
    return StateMachine(CLUSTER).snapshot()


def refusal(data: bytes) -> str:
    with pytest.raises(snapshot.SnapshotError) as refused:
        snapshot.decode(data)
    return str(refused.value)


def test_an_empty_key_is_written_as_protobuf_writes_it() -> None:
    """Commands never write an empty key, but a snapshot can hold one (a first record without a
    key decodes to b""), and it must re-encode to the same bytes."""
    for data in ({b"": b"v"}, {b"": b""}, {b"": b"v", b"k": b"w"}):
        state = snapshot.State(CLUSTER, SessionStore(1), data)
        assert snapshot.encode(state) == reference_encode(state)
        assert snapshot.decode(reference_encode(state)).data == data


def test_a_record_of_128_bytes_has_a_two_byte_length_and_decodes() -> None:
    """0x80, the first length that takes two varint bytes, is not a one-byte length."""
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k": b"v" * 123})  # 3 + 125 bytes
    encoded = reference_encode(state)
    assert encoded.endswith(b"\x2a\x80\x01\x0a\x01k\x12\x7b" + b"v" * 123)
    assert snapshot.decode(encoded).data == state.data


def test_a_record_cut_after_its_key_tag_at_the_end_is_refused() -> None:
    assert refusal(empty_snapshot() + b"\x2a\x01\x0a") == \
        "not the canonical encoding of a Snapshot: bad varint"


def test_a_record_longer_than_what_is_left_is_refused_as_truncated() -> None:
    assert refusal(empty_snapshot() + b"\x2a\x05\x0a\x01k") == \
        "not the canonical encoding of a Snapshot: truncated record"


def test_an_empty_key_written_out_is_refused() -> None:
    """protobuf leaves an empty field out, so a key field of length 0 is not canonical."""
    assert refusal(empty_snapshot() + b"\x2a\x05\x0a\x00\x12\x01v") == \
        "not the canonical encoding of a KeyValue"


def test_a_record_of_two_values_and_no_key_is_refused() -> None:
    assert refusal(empty_snapshot() + b"\x2a\x06\x12\x01v\x12\x01w") == \
        "not the canonical encoding of a KeyValue"


def test_a_record_cut_after_its_value_tag_at_the_end_is_refused() -> None:
    assert refusal(empty_snapshot() + b"\x2a\x04\x0a\x01k\x12") == \
        "not the canonical encoding of a Snapshot: bad varint"


@pytest.mark.parametrize("record", [
    b"\x2a\x12\x0a\x01k\x1a\x0d" + b"x" * 13,  # a 1-byte key, then field 3 (18 bytes in all)
    b"\x2a\x12\x0a\x03kkk\x1a\x0b" + b"x" * 11,  # a 3-byte key, then field 3 (18 bytes)
    b"\x2a\x17\x0a\x01k\x1a\x12" + b"x" * 18,  # field 3 holding 18 bytes (0x12, the value tag)
], ids=["after-1-byte-key", "after-3-byte-key", "of-18-bytes"])
def test_an_unknown_field_after_the_key_is_refused(record: bytes) -> None:
    assert refusal(empty_snapshot() + record) == "not the canonical encoding of a KeyValue"


def test_keys_whose_bytes_look_like_record_headers_decode_to_themselves() -> None:
    """The inline reading of a record reads the key's length where it is, never a byte of the
    key or of the record's own length as one."""
    data = {b"\x01\x12\x01": b"v",  # key bytes that read as "1 byte, value tag, 1 byte"
            b"a\x12\x05x": b"y" * 150,  # a record of two length bytes, the second 0x01
            b"k" * 127 + b"\x12": b"v"}  # a key of 128 bytes: a length of two bytes, 0x80 0x01
    state = snapshot.State(CLUSTER, SessionStore(1), data)
    assert snapshot.decode(reference_encode(state)).data == data


def test_the_same_key_twice_is_refused_as_a_duplicate() -> None:
    assert refusal(empty_snapshot() + b"\x2a\x03\x0a\x01k" * 2) == "duplicate key in snapshot"


def test_a_key_below_the_one_before_is_refused_as_out_of_order() -> None:
    assert refusal(empty_snapshot() + b"\x2a\x03\x0a\x01k" + b"\x2a\x03\x0a\x01a") == \
        "keys out of order in snapshot"


def test_decoding_pauses_after_every_piece_entries_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once after the sessions, then after records 3, 6, ... 18 of 20: no more, no fewer."""
    monkeypatch.setattr(snapshot, "PIECE_ENTRIES", 3)
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k%03d" % n: b"v" for n in range(20)})
    steps = snapshot.decode_steps(reference_encode(state))
    pauses = 0
    with pytest.raises(StopIteration):
        while True:
            next(steps)
            pauses += 1
    assert pauses == 1 + 6


def test_a_padded_varint_length_is_refused() -> None:
    """0x81 0x00 reads as 1, but protobuf writes 1 as 0x01: not canonical."""
    assert refusal(empty_snapshot() + b"\x2a\x04\x0a\x81\x00z") == \
        "not the canonical encoding of a Snapshot: bad varint"


def test_a_varint_of_2_to_the_64_is_refused() -> None:
    """Nine continuation bytes and 0x02: 2**64, one past what a varint may hold."""
    assert refusal(empty_snapshot() + b"\x2a" + b"\x80" * 9 + b"\x02") == \
        "not the canonical encoding of a Snapshot: bad varint"


def test_each_piece_of_data_holds_piece_entries_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "PIECE_ENTRIES", 3)
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k%d" % n: b"v" for n in range(10)})
    header, sort_pause, *data = snapshot.encode_pieces(snapshot.freeze(state))
    assert sort_pause == b""
    record = len(b"\x2a\x06\x0a\x02k0\x12\x01v")
    assert [len(piece) // record for piece in data] == [3, 3, 3, 1]


def test_keys_are_sorted_in_runs_of_sort_run_with_a_pause_after_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "SORT_RUN", 3)
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k%03d" % n: b"v" for n in range(200)})
    pieces = list(snapshot.encode_pieces(snapshot.freeze(state)))
    assert pieces[1:68] == [b""] * 67 and pieces[68] != b""  # ceil(200 / 3) runs


def test_a_key_as_long_as_the_varint_table_is_written_as_protobuf_writes_it() -> None:
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k" * (1 << 14): b"v"})
    assert snapshot.encode(state) == reference_encode(state)


def test_while_the_encoder_merges_no_object_the_collector_visits_holds_the_keys(
        tiny_pieces: None) -> None:
    """The sorted runs are held so that the garbage collector does not visit them: a collection
    during a snapshot of 1M keys visited every key, 50-95 ms with the interpreter held."""
    state = snapshot.State(CLUSTER, SessionStore(1), {b"k%03d" % n: b"v" for n in range(60)})
    pieces = snapshot.encode_pieces(snapshot.freeze(state))
    while not next(pieces).startswith(b"\x2a"):
        pass  # the runs are sorted: the merge has begun
    last = max(state.data)  # in its run, behind the key the merge reads next
    assert not [r for r in gc.get_referrers(last) if gc.is_tracked(r)]
    assert b"".join(pieces)  # (the rest)


def test_the_merge_lets_go_of_each_run_once_it_has_read_it(tiny_pieces: None) -> None:
    """Not all runs at once at the end of the merge: at 1M keys that was one C call touching
    every key with the interpreter held."""
    data = {b"k%03d" % n: b"v" for n in range(60)}  # the first run (of 3) holds the 3 smallest
    frozen = snapshot.freeze(snapshot.State(CLUSTER, SessionStore(1), data))
    first = next(iter(data))
    before = sys.getrefcount(first)
    pieces = snapshot.encode_pieces(frozen)
    records = 0
    while records < 6:  # the first run read, and the key after it
        piece = next(pieces)
        records += piece.count(b"\x12\x01v") if piece.startswith(b"\x2a") else 0
    assert sys.getrefcount(first) == before
    assert b"".join(pieces)
