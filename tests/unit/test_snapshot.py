"""Snapshots (``kvstore.snapshot``): deterministic bytes, versioned, validated on restore."""

from __future__ import annotations

import pytest

from kvstore import SnapshotError, StateMachine, encode_entry, ops
from kvstore.proto.log_pb2 import Snapshot
from kvstore.snapshot import FORMAT_VERSION, WITHOUT_DIGESTS_VERSION
from session import Session, new_noop_session

CLUSTER = 5


def populated() -> StateMachine:
    sm = StateMachine(CLUSTER, session_capacity=8)
    for client_id in (30, 10, 20):
        sm.apply(encode_entry(Session(CLUSTER, client_id, series_id=2**64 - 2)))
        sm.apply(encode_entry(Session(CLUSTER, client_id, series_id=1), ops.incr(b"n")))
    for key in (b"z", b"a", b"m"):
        sm.apply(encode_entry(new_noop_session(CLUSTER), ops.put(key, key * 3)))
    return sm


def test_same_state_reached_in_another_insertion_order_gives_the_same_bytes() -> None:
    """Data is written sorted: dict insertion order must not leak into the snapshot."""
    a = StateMachine(CLUSTER)
    b = StateMachine(CLUSTER)
    a.data = {b"x": b"1", b"y": b"2"}
    b.data = {b"y": b"2", b"x": b"1"}
    assert a.snapshot() == b.snapshot() and a.digest() == b.digest()


def test_snapshot_layout_is_version_capacity_sessions_in_lru_order_then_sorted_data() -> None:
    snapshot = Snapshot.FromString(populated().snapshot())
    assert snapshot.format_version == FORMAT_VERSION
    assert snapshot.cluster_id == CLUSTER and snapshot.session_capacity == 8
    assert [s.client_id for s in snapshot.sessions] == [30, 10, 20]
    assert [list(r.series_id for r in s.responses) for s in snapshot.sessions] == [[1]] * 3
    assert [kv.key for kv in snapshot.data] == [b"a", b"m", b"n", b"z"]


def test_restore_round_trips_to_identical_bytes() -> None:
    sm = populated()
    restored = StateMachine(CLUSTER, session_capacity=1)
    restored.restore(sm.snapshot())
    assert restored.snapshot() == sm.snapshot()
    assert restored.sessions.capacity == 8, "the capacity is replicated state"
    assert restored.digest() == sm.digest()


def test_digest_changes_with_the_state() -> None:
    sm = populated()
    before = sm.digest()
    sm.apply(encode_entry(new_noop_session(CLUSTER), ops.put(b"a", b"changed")))
    assert sm.digest() != before and len(before) == 16


@pytest.mark.parametrize(
    ("snapshot", "message"),
    [
        (Snapshot(format_version=99, cluster_id=CLUSTER, session_capacity=1), "version 99"),
        (Snapshot(format_version=WITHOUT_DIGESTS_VERSION, cluster_id=CLUSTER), "at least 1"),
        (Snapshot(format_version=WITHOUT_DIGESTS_VERSION, cluster_id=CLUSTER + 1, session_capacity=1),
         "cluster"),
    ],
)
def test_restore_refuses_snapshots_it_cannot_read(snapshot: Snapshot, message: str) -> None:
    sm = populated()
    before = sm.snapshot()
    with pytest.raises(SnapshotError, match=message):
        sm.restore(snapshot.SerializeToString())
    assert sm.snapshot() == before, "a refused snapshot changes nothing"


def test_restore_refuses_duplicates_and_garbage() -> None:
    sm = populated()
    duplicated = Snapshot.FromString(sm.snapshot())
    duplicated.data.add(key=b"a", value=b"again")
    with pytest.raises(SnapshotError, match="duplicate key"):
        sm.restore(duplicated.SerializeToString())
    with pytest.raises(SnapshotError):
        sm.restore(b"\x0a\xff")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.sessions[0].responses.add(series_id=1, result=b""), "ascending"),
        (lambda s: setattr(s.sessions[0], "responded_to", 1), "acknowledged"),
        (lambda s: setattr(s.sessions[0], "client_id", 0), "reserved"),
    ],
)
def test_restore_refuses_session_records_our_encoder_never_writes(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    """So that restore is exact: re-encoding a restored state gives back the same bytes."""
    sm = populated()
    snapshot = Snapshot.FromString(sm.snapshot())
    mutate(snapshot)
    with pytest.raises(SnapshotError, match=message):
        sm.restore(snapshot.SerializeToString(deterministic=True))


def test_restore_refuses_non_canonical_bytes() -> None:
    """An unknown field appended: every protobuf backend must refuse it alike."""
    with pytest.raises(SnapshotError, match="canonical"):
        populated().restore(populated().snapshot() + b"\xf8\x01\x01")
