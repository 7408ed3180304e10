"""Snapshots (``kvstore.snapshot``): deterministic bytes, versioned, validated on restore."""

from __future__ import annotations

import pytest

from kvstore import SnapshotError, StateMachine, encode_entry, ops, results
from kvstore.dedup import command_digest
from kvstore.entry import command_bytes
from kvstore.proto.log_pb2 import Code, Snapshot
from kvstore.snapshot import FORMAT_VERSION, WITHOUT_DIGESTS_VERSION
from session import Session, new_noop_session
from tests.unit.old_snapshots import GOLDEN_CLUSTER, GOLDEN_VERSION_1, as_version_1

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
        (Snapshot(format_version=99, cluster_id=CLUSTER, session_capacity=1),
         "snapshot format version 99, this build reads 1 and 2"),
        (Snapshot(format_version=WITHOUT_DIGESTS_VERSION, cluster_id=CLUSTER),
         "invalid session store in snapshot: session capacity must be at least 1, got 0"),
        (Snapshot(format_version=WITHOUT_DIGESTS_VERSION, cluster_id=CLUSTER + 1,
                  session_capacity=1),
         f"snapshot of cluster {CLUSTER + 1}, this is {CLUSTER}"),
    ],
)
def test_restore_refuses_snapshots_it_cannot_read(snapshot: Snapshot, message: str) -> None:
    sm = populated()
    before = sm.snapshot()
    with pytest.raises(SnapshotError) as refused:
        sm.restore(snapshot.SerializeToString())
    assert str(refused.value) == message  # the whole message: an operator reads it
    assert sm.snapshot() == before, "a refused snapshot changes nothing"


def test_restore_refuses_duplicates_and_garbage() -> None:
    sm = populated()
    duplicated = Snapshot.FromString(sm.snapshot())
    duplicated.data.add(key=b"a", value=b"again")
    with pytest.raises(SnapshotError, match="^duplicate key in snapshot$"):
        sm.restore(duplicated.SerializeToString())
    with pytest.raises(SnapshotError, match="^not a valid Snapshot encoding$"):
        sm.restore(b"\x0a\xff")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.sessions[0].responses.add(series_id=1, result=b""),
         r"^session \d+: cached series ids not strictly ascending$"),
        (lambda s: setattr(s.sessions[0], "responded_to", 1),
         r"^session \d+: cached series 1 already acknowledged$"),
        (lambda s: setattr(s.sessions[0], "client_id", 0),
         "^a session with the reserved client id 0$"),
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
    with pytest.raises(SnapshotError, match="^not the canonical encoding of a Snapshot$"):
        populated().restore(populated().snapshot() + b"\xf8\x01\x01")


# -- version 2: command digests; version 1 still restores -----------------------------------


def test_every_cached_result_carries_the_digest_of_its_command_in_version_2() -> None:
    sm = populated()
    snapshot = Snapshot.FromString(sm.snapshot())
    assert snapshot.format_version == FORMAT_VERSION == 2
    entry = encode_entry(Session(CLUSTER, 30, series_id=1), ops.incr(b"n"))
    wanted = command_digest(command_bytes(entry))
    assert [[c.command_digest for c in s.responses] for s in snapshot.sessions] == [[wanted]] * 3


def test_a_state_without_digests_is_written_as_version_1() -> None:
    """The oldest version that holds the state: no cached result, no digest, version 1 (so a
    build without digests could read it too)."""
    sm = StateMachine(CLUSTER)
    sm.apply(encode_entry(Session(CLUSTER, 30, series_id=2**64 - 2)))
    sm.apply(encode_entry(new_noop_session(CLUSTER), ops.put(b"k", b"v")))
    assert Snapshot.FromString(sm.snapshot()).format_version == WITHOUT_DIGESTS_VERSION == 1


def test_the_version_1_snapshot_of_the_build_before_digests_restores_exactly() -> None:
    """Bytes written by the code before this format change. They restore, and re-encode to the
    same bytes: a node restarting from an old snapshot file checks the restored state's digest
    against the one recorded in the file (``kvstore/node/raft_node.py``)."""
    sm = StateMachine(GOLDEN_CLUSTER)
    sm.restore(GOLDEN_VERSION_1)
    assert sm.snapshot() == GOLDEN_VERSION_1
    assert [s.client_id for s in sm.sessions] == [30, 20, 10]
    assert sm.data == {b"k": b"v", b"n": b"3"}
    assert all(not s.command_digests for s in sm.sessions)


def test_results_from_version_1_answer_any_command_until_acknowledged() -> None:
    """Today's behaviour for them: without a digest, rule 8 cannot tell a retry from another
    command, and answers from the cache as before. New results get digests: rule 8b."""
    sm = StateMachine(GOLDEN_CLUSTER)
    sm.restore(GOLDEN_VERSION_1)

    def send(series: int, responded_to: int, command: ops.Command) -> results.Result:
        entry = encode_entry(Session(GOLDEN_CLUSTER, 30, series, responded_to), command)
        return results.decode(sm.apply(entry))

    assert send(1, 0, ops.put(b"other", b"x")).number == 1, "the old answer, not applied"
    assert b"other" not in sm.data
    assert send(2, 1, ops.incr(b"n")).number == 4  # acknowledges series 1, caches series 2
    assert send(2, 1, ops.put(b"other", b"x")).code == Code.SERIES_REUSED
    assert send(1, 1, ops.put(b"other", b"x")).code == Code.ALREADY_RESPONDED
    assert b"other" not in sm.data and sm.data[b"n"] == b"4"


def test_a_version_2_snapshot_keeps_results_without_digest_as_they_are() -> None:
    """After an upgrade a store holds both kinds for a while: version 2 writes an empty digest
    for the old results, and restoring it gives the same store back."""
    sm = StateMachine(GOLDEN_CLUSTER)
    sm.restore(GOLDEN_VERSION_1)
    sm.apply(encode_entry(Session(GOLDEN_CLUSTER, 30, 2, 1), ops.incr(b"n")))
    image = sm.snapshot()
    snapshot = Snapshot.FromString(image)
    assert snapshot.format_version == FORMAT_VERSION
    digests = {s.client_id: [len(c.command_digest) for c in s.responses] for s in snapshot.sessions}
    assert digests == {20: [0], 10: [0], 30: [8]}
    restored = StateMachine(GOLDEN_CLUSTER)
    restored.restore(image)
    assert restored.snapshot() == image
    old = restored.sessions.peek(20)
    assert old is not None and old.cached_response(1) is not None and old.command_digest(1) is None


def test_as_version_1_is_what_the_old_build_wrote() -> None:
    """The test helper that makes version-1 snapshots of any state agrees with the real one."""
    sm = StateMachine(GOLDEN_CLUSTER)
    sm.restore(GOLDEN_VERSION_1)
    sm.apply(encode_entry(Session(GOLDEN_CLUSTER, 30, 2, 1), ops.incr(b"n")))
    sm.apply(encode_entry(Session(GOLDEN_CLUSTER, 30, 3, 2), ops.incr(b"n", -1)))
    # Now session 30 holds series 3 with a digest; the other two still have their old results.
    assert as_version_1(GOLDEN_VERSION_1) == GOLDEN_VERSION_1
    old = StateMachine(GOLDEN_CLUSTER)
    old.restore(as_version_1(sm.snapshot()))
    assert old.snapshot() == as_version_1(sm.snapshot())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: setattr(s, "format_version", 1), "version-1 snapshot with command digests"),
        (lambda s: setattr(s, "format_version", 3), "version 3, this build reads 1 and 2"),
        (lambda s: setattr(s, "format_version", 0), "version 0"),
        (lambda s: setattr(s.sessions[1].responses[0], "command_digest", b"\x01" * 7),
         "7 bytes, not 8"),
        (lambda s: setattr(s.sessions[1].responses[0], "command_digest", b"\x01" * 9),
         "9 bytes, not 8"),
        (lambda s: [c.ClearField("command_digest") for r in s.sessions for c in r.responses],
         "version-2 snapshot without command digests"),
    ],
    ids=["v1 with digests", "v3", "v0", "short digest", "long digest", "v2 without digests"],
)
def test_restore_refuses_digests_our_encoder_never_writes(  # type: ignore[no-untyped-def]
    mutate, message: str
) -> None:
    sm = populated()
    before = sm.snapshot()
    snapshot = Snapshot.FromString(before)
    mutate(snapshot)
    with pytest.raises(SnapshotError, match=message):
        sm.restore(snapshot.SerializeToString(deterministic=True))
    assert sm.snapshot() == before, "a refused snapshot changes nothing"


def test_one_result_with_a_digest_is_enough_for_version_2() -> None:
    """Only all digests missing is refused in version 2: old results have none."""
    sm = populated()
    snapshot = Snapshot.FromString(sm.snapshot())
    for record in snapshot.sessions[1:]:
        for cached in record.responses:
            cached.ClearField("command_digest")
    image = snapshot.SerializeToString(deterministic=True)
    restored = StateMachine(CLUSTER)
    restored.restore(image)
    assert restored.snapshot() == image
