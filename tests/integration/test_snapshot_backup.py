"""``kv snapshot save`` / ``restore`` end to end: a backup taken from a live cluster over the API,
restored into a new cluster directory that serves the same data, with the same digest, and
answers a replayed retry from the restored session cache.

One original cluster serves the module; the snapshot is saved once (``saved``) and each test
restores it where it needs to.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cli import exits
from cli.cluster_dir import ClusterDir
from kvstore.proto import api_pb2
from tests.integration.conftest import Cluster, bring_down

pytestmark = pytest.mark.integration


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


@dataclass
class Saved:
    file: Path
    session: Path
    """The session file as it was after the last write before the save."""
    retry: Path
    """A copy of the session file from before that write: replaying it is a retry."""
    status: dict[str, object]
    """``kv snapshot status -w json`` of the file."""


@pytest.fixture(scope="module")
def saved(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    where = tmp_path_factory.mktemp("backup")
    session, retry = where / "s.json", where / "retry.json"
    cluster.run("put", "greeting", "hello", check=True)
    cluster.run("put", "app/a", "1", check=True)
    cluster.run("session", "open", "--session", str(session), check=True)
    assert cluster.run("incr", "orders", "--session", str(session), check=True).stdout == "1\n"
    shutil.copy(session, retry)
    assert cluster.run("incr", "orders", "--session", str(session), check=True).stdout == "2\n"

    file = where / "backup.kvsnap"
    done = cluster.run("snapshot", "save", str(file), check=True)
    assert re.fullmatch(rf"saved snapshot of cluster {cluster.spec.cluster_id} at index \d+ to "
                        rf"{re.escape(str(file))}: 3 keys, 1 session, digest [0-9a-f]{{16}}, "
                        r"[\d,]+ bytes\n", done.stdout), done.stdout
    assert not file.with_name(file.name + ".part").exists()
    status = json.loads(cluster.run("snapshot", "status", str(file), "-w", "json",
                                    check=True).stdout)
    return Saved(file, session, retry, status)


@pytest.fixture
def restored(saved: Saved, tmp_path: Path) -> Iterator[Cluster]:
    """A new cluster restored from the saved snapshot, running; brought down afterwards."""
    new = Cluster(tmp_path / "restored")
    try:
        done = new.run("snapshot", "restore", str(saved.file), check=True)
        assert done.stdout.splitlines() == [
            f"restored cluster {saved.status['cluster_id']} at index {saved.status['index']} "
            f"(digest {saved.status['digest']}) into {new.dir}: 3 nodes",
            f"start it with: kv cluster up --detach --dir {new.dir}"]
        new.up()
        yield new
    finally:
        bring_down(new)


def test_the_snapshot_is_the_clusters_state(cluster: Cluster, saved: Saved) -> None:
    assert saved.status["cluster_id"] == cluster.spec.cluster_id
    assert (saved.status["keys"], saved.status["sessions"]) == (3, 1)
    # Nothing changes the state after the save: every replica still has the saved digest.
    digests = {row["digest"] for row in cluster.status()}
    assert digests == {saved.status["digest"]}


def test_a_restored_cluster_serves_the_same_data_and_replays_a_retry_from_its_cache(
        cluster: Cluster, saved: Saved, restored: Cluster) -> None:
    original, new = cluster.spec, restored.spec
    assert new.cluster_id == original.cluster_id and new.session_capacity == 4096
    assert not {n.raft for n in new.nodes} & {n.raft for n in original.nodes}
    assert (restored.dir / "secret").read_bytes() != (cluster.dir / "secret").read_bytes()
    restored.wait_for(lambda: {r["digest"] for r in restored.status()} == {saved.status["digest"]},
                      20, "every restored replica to hold the saved digest")
    assert restored.run("get", "", "--prefix", check=True).stdout.splitlines() == [
        "app/a", "1", "greeting", "hello", "orders", "2"]

    # The client that lost the answer to its second increment retries it: the restored cache
    # answers, nothing is applied again.
    assert restored.run("incr", "orders", "--session", str(saved.retry), check=True).stdout == "2\n"
    assert restored.run("get", "orders", check=True).stdout == "orders\n2\n"
    session = saved.session.with_name("restored-s.json")
    shutil.copy(saved.session, session)
    assert restored.run("incr", "orders", "--session", str(session), check=True).stdout == "3\n"

    # A restart of the restored cluster comes back from its own disk.
    assert "n1: stopped" in restored.down().stderr
    restored.up()
    assert restored.run("get", "orders", check=True).stdout == "orders\n3\n"


def test_a_later_save_covers_later_writes_even_through_a_follower(
        cluster: Cluster, saved: Saved) -> None:
    # The leader's snapshot file from the first save is older than this write: the second save
    # must not be served from it.
    cluster.run("put", "later", "yes", check=True)
    leader = cluster.wait_for(cluster.leader_id, 10, "a leader")
    follower = next(n for n in cluster.node_ids if n != leader)
    again = saved.file.with_name("again.kvsnap")
    done = cluster.run("--endpoints", cluster.endpoint(follower), "snapshot", "save", str(again),
                       "-w", "json", check=True)
    doc = json.loads(done.stdout)
    first: dict[str, int | str] = saved.status  # type: ignore[assignment]
    assert doc["keys"] == int(first["keys"]) + 1 and doc["index"] > int(first["index"])
    assert doc["digest"] != first["digest"]
    assert doc["digest"] == next(r["digest"] for r in cluster.status() if r["id"] == leader)


def test_a_one_node_restore(saved: Saved, tmp_path: Path) -> None:
    single = Cluster(tmp_path / "single")
    try:
        single.run("snapshot", "restore", str(saved.file), "--nodes", "1", check=True)
        single.up()
        assert single.run("get", "greeting", check=True).stdout == "greeting\nhello\n"
        assert single.run("put", "after", "restore", check=True).stdout == "OK\n"
    finally:
        bring_down(single)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:200] + bytes([b[200] ^ 1]) + b[201:],
     "is damaged: its checksum does not match its content (the file was cut short or altered)"),
    (lambda b: b[: len(b) // 2],
     "is damaged: its checksum does not match its content (the file was cut short or altered)"),
    (lambda b: b"PK\x03\x04 some zip file",
     "is not a kv snapshot file (kv snapshot save writes them)"),
])
def test_a_damaged_file_is_refused_and_nothing_is_created(
        saved: Saved, tmp_path: Path, damage: object, message: str) -> None:
    bad = tmp_path / "bad.kvsnap"
    bad.write_bytes(damage(saved.file.read_bytes()))  # type: ignore[operator]
    target = Cluster(tmp_path / "never")
    for args in (("snapshot", "restore", str(bad)), ("snapshot", "status", str(bad))):
        refused = target.run(*args)
        assert (refused.returncode, refused.stdout) == (exits.INVALID_INPUT, "")
        assert one_error_line(refused) == f"Error: {bad} {message}"
    assert not target.dir.exists()


def test_restore_never_writes_over_a_cluster_of_another_id(saved: Saved, tmp_path: Path) -> None:
    other = Cluster(tmp_path / "other")
    spec = ClusterDir(other.dir).create(1)
    before = {p: p.read_bytes() for p in other.dir.rglob("*") if p.is_file()}
    refused = other.run("snapshot", "restore", str(saved.file))
    assert refused.returncode == exits.INVALID_INPUT
    assert one_error_line(refused) == (
        f"Error: {other.dir} already holds cluster {spec.cluster_id}; the snapshot is of cluster "
        f"{saved.status['cluster_id']}: restore creates a new cluster directory (choose another "
        "--dir)")
    assert {p: p.read_bytes() for p in other.dir.rglob("*") if p.is_file()} == before


def test_the_snapshot_rpc_refuses_bad_requests(cluster: Cluster) -> None:
    endpoint = cluster.endpoint(cluster.wait_for(cluster.leader_id, 10, "a leader"))
    with cluster.channel(endpoint) as channel:
        raw = channel.unary_stream("/kvstore.KV/Snapshot", request_serializer=lambda b: b,
                                   response_deserializer=api_pb2.SnapshotChunk.FromString)
        with pytest.raises(grpc.RpcError) as malformed:
            list(raw(b"\xff\xff\xff", timeout=10))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wrong = api_pb2.SnapshotRequest(cluster_id=cluster.spec.cluster_id + 2)
        with pytest.raises(grpc.RpcError) as mismatch:
            list(raw(wrong.SerializeToString(), timeout=10))
        assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cluster mismatch" in (mismatch.value.details() or "")
