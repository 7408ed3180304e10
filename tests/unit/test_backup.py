"""``kvstore.backup``: a backup is checked before anything trusts it, and rewritten for a new
cluster without touching the state it holds."""

from __future__ import annotations

import pytest

from kvstore import encode_entry, ops
from kvstore.backup import BackupError, for_new_cluster, parse, rewrite_membership
from kvstore.node import dump_file
from kvstore.state_machine import StateMachine
from session import new_session

CLUSTER_ID = 11
OLD_MEMBERS = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]


def a_state() -> StateMachine:
    sm = StateMachine(CLUSTER_ID, session_capacity=8)
    session = new_session(CLUSTER_ID)
    session.prepare_for_register()
    sm.apply(encode_entry(session))
    session.prepare_for_propose()
    sm.apply(encode_entry(session, ops.put(b"greeting", b"hello")))
    session.proposal_completed()
    sm.apply(encode_entry(session, ops.incr(b"orders", 2)))  # its answer stays cached
    return sm


def backup_bytes(sm: StateMachine | None = None, **meta_changes: object) -> bytes:
    sm = sm or a_state()
    meta: dict[str, object] = {"last": ["ab", 42, 7], "prev": ["cd", 41, 7],
                               "cluster": OLD_MEMBERS, "digest": sm.digest()}
    meta.update(meta_changes)
    return dump_file.encode(meta, sm.snapshot())


def test_a_backup_says_what_it_holds() -> None:
    sm = a_state()
    data = backup_bytes(sm)
    backup = parse(data, "b.kvsnap")
    assert backup.describe() == {
        "cluster_id": CLUSTER_ID, "index": 42, "term": 7, "digest": sm.digest(), "keys": 2,
        "sessions": 1, "session_capacity": 8, "members": 3, "bytes": len(data)}


def test_a_new_cluster_gets_its_members_and_restarted_terms_and_the_same_state() -> None:
    backup = parse(backup_bytes(), "b.kvsnap")
    new = ["127.0.0.1:9003", "127.0.0.1:9001"]
    installed = dump_file.decode(for_new_cluster(backup, new), "n1/raft.dump")
    assert installed.meta["cluster"] == sorted(new)
    assert installed.meta["last"] == ["ab", 42, 0] and installed.meta["prev"] == ["cd", 41, 0]
    assert installed.snapshot == backup.snapshot
    assert installed.meta["digest"] == backup.digest
    replica = StateMachine(CLUSTER_ID, 8)
    replica.restore(installed.snapshot)
    assert replica.digest() == backup.digest
    assert backup.meta["cluster"] == OLD_MEMBERS  # the original is not changed


def test_membership_is_rewritten_in_one_place() -> None:
    meta = {"cluster": ["a:1"], "digest": "x", "extra": 1,
            "membership": {"index": 7, "table": {"change": "add learner n4", "members": []}}}
    assert rewrite_membership(meta, ["c:3", "b:2"]) == {"cluster": ["b:2", "c:3"], "digest": "x",
                                                         "extra": 1}
    assert meta["cluster"] == ["a:1"] and "membership" in meta


@pytest.mark.parametrize("offset", [0, 9, 40, 200, -40, -1])
def test_a_flipped_byte_anywhere_is_refused(offset: int) -> None:
    data = bytearray(backup_bytes())
    data[offset] ^= 0x01
    with pytest.raises(BackupError) as refused:
        parse(bytes(data), "b.kvsnap")
    assert str(refused.value) in (
        "b.kvsnap is damaged: its checksum does not match its content (the file was cut short "
        "or altered)",
        "b.kvsnap is not a kv snapshot file (kv snapshot save writes them)")  # the magic itself


@pytest.mark.parametrize("keep", [0, 5, 20, 100, -1])
def test_a_file_cut_short_is_refused(keep: int) -> None:
    data = backup_bytes()
    with pytest.raises(BackupError, match="is damaged|is not a kv snapshot file"):
        parse(data[:keep], "b.kvsnap")


def test_a_state_that_does_not_match_its_digest_is_refused() -> None:
    with pytest.raises(BackupError) as refused:
        parse(backup_bytes(digest="0" * 16), "b.kvsnap")
    assert str(refused.value).startswith(
        "b.kvsnap: the state inside does not match its recorded digest")


def test_a_header_this_version_does_not_read_is_refused() -> None:
    meta = {"last": ["ab", 42, 7], "prev": ["cd", 41, 7], "digest": a_state().digest()}
    data = dump_file.encode(meta, a_state().snapshot())  # no "cluster"
    with pytest.raises(BackupError, match="its header is not one this version reads"):
        parse(data, "b.kvsnap")
    with pytest.raises(BackupError, match="its header is not one this version reads"):
        parse(backup_bytes(last=["ab", -1, 7]), "b.kvsnap")


def test_a_sealed_file_holding_no_valid_snapshot_is_refused() -> None:
    data = dump_file.encode({"last": ["", 1, 1], "prev": ["", 0, 1], "cluster": [],
                             "digest": "x"}, b"\xff\xff not a snapshot")
    with pytest.raises(BackupError, match="the snapshot inside is not valid"):
        parse(data, "b.kvsnap")
