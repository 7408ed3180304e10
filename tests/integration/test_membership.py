"""Membership changes on a real cluster of node processes, driven with ``kv`` commands only.

Raft thesis chapter 4 and etcd's learners, end to end: a cluster grows and shrinks while a
client writes with a session, the leader is removed, a node whose disk is gone is replaced, a
removed node stops serving, membership survives restarts after log compaction, and a session
opened before a change is answered from the cache of a member that joined by snapshot.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from collections import Counter
from typing import Any

import pytest

from cli import exits
from kvstore import errors, ops
from kvstore.client import Client
from tests.integration.conftest import Cluster
from tests.support import free_port

pytestmark = pytest.mark.integration

STREAM_DEADLINE = 120.0
"""The background writer stops by itself after this long, whatever the test does."""


def members(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """``kv member list -w json``, by name."""
    doc = json.loads(cluster.run("-w", "json", "member", "list", check=True).stdout)
    return {m["name"]: m for m in doc["members"]}


def voters(cluster: Cluster) -> set[str]:
    return {name for name, m in members(cluster).items() if m["role"] == "voter"}


def leader(cluster: Cluster) -> str:
    return cluster.wait_for(lambda: next((n for n, m in members(cluster).items()
                                          if m["is_leader"]), None), 20, "a leader")


def client_of(cluster: Cluster) -> Client:
    return cluster.client(timeout=10, cluster_id=cluster.spec.cluster_id)


def wait_converged(cluster: Cluster, client: Client, endpoints: list[str]) -> str:
    """Waits until ``endpoints`` have applied the same index and hold the same digest."""
    def same() -> str | None:
        try:
            views = [client.status(e, with_digest=True) for e in endpoints]
        except errors.Unavailable:
            return None
        if len({v.applied_index for v in views}) == 1 and len({v.digest for v in views}) == 1:
            return views[0].digest
        return None

    return cluster.wait_for(same, 30, f"{endpoints} at the same index and digest")


class Writer(threading.Thread):
    """One session incrementing a counter until stopped; an ambiguous outcome is retried with
    the same series id, so the final counter must equal the acknowledged increments."""

    def __init__(self, cluster: Cluster, key: bytes) -> None:
        super().__init__(daemon=True)
        self.client = cluster.client(timeout=5, cluster_id=cluster.spec.cluster_id)
        self.key = key
        self.stop_event = threading.Event()
        self.acknowledged = 0
        self.retried: Counter[str] = Counter()
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + STREAM_DEADLINE
        session = self.client.sync_get_session()
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                result = self.client.sync_propose(session, ops.incr(self.key), timeout=5)
            except (errors.OutcomeUnknown, errors.Unavailable) as exc:
                self.retried[type(exc).__name__] += 1  # same session, same series id: safe
                continue
            except errors.KVError as exc:
                self.errors.append(repr(exc))
                return
            session.proposal_completed()
            self.acknowledged += 1
            if result.number != self.acknowledged:
                self.errors.append(f"increment {self.acknowledged} returned {result.number}")
                return

    def finish(self, at_least: int) -> int:
        """Lets it make ``at_least`` more increments, stops it, returns the acknowledged."""
        target = self.acknowledged + at_least
        deadline = time.monotonic() + 30
        while self.acknowledged < target and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.05)
        self.stop_event.set()
        self.join(30)
        assert not self.errors, self.errors
        assert self.acknowledged >= target, f"only {self.acknowledged} increments in 30 s"
        return self.acknowledged


def test_grow_to_five_and_back_to_three_removing_the_leader_while_a_client_writes(
        own_cluster: Cluster) -> None:
    """Thesis 4.1-4.2: one server at a time, learners first, the leader removed after it hands
    over. The writer goes on throughout; every increment is applied once; the three nodes left
    end with the same state."""
    own_cluster.up("--snapshot-count", "50")
    writer = Writer(own_cluster, b"membership/counter")
    writer.start()
    for _ in range(2):
        own_cluster.run("cluster", "add-node", check=True)
    assert voters(own_cluster) == {"n1", "n2", "n3", "n4", "n5"}
    assert own_cluster.node_ids == ["n1", "n2", "n3", "n4", "n5"]

    first = leader(own_cluster)
    own_cluster.run("cluster", "remove-node", first, check=True)
    assert first not in own_cluster.node_ids
    second = next(n for n in sorted(voters(own_cluster)) if n != leader(own_cluster))
    own_cluster.run("cluster", "remove-node", second, check=True)

    remaining = voters(own_cluster)
    assert len(remaining) == 3 and first not in remaining and second not in remaining
    assert set(own_cluster.node_ids) == remaining
    acknowledged = writer.finish(at_least=20)
    with client_of(own_cluster) as client:
        wait_converged(own_cluster, client, own_cluster.endpoints)
        assert client.get(b"membership/counter").value == str(acknowledged).encode()
    rows = {row["id"]: row for row in own_cluster.status()}
    assert {row["role"] for row in rows.values()} <= {"leader", "follower"}


def test_a_lost_member_with_its_disk_gone_is_replaced_while_a_client_writes(
        own_cluster: Cluster) -> None:
    """Thesis 4.2.1 (a new server catches up before it counts) and the README's replacement
    steps. n3 is lost with its disk: kv cluster up refuses to bring it back under its old
    identity (it forgot what it stored and whom it voted for, so a committed write could be
    lost). With n3 gone the cluster tolerates no further fault, and an empty voter would join
    every majority while empty; a learner changes nothing: writes go on while it catches up
    (from a snapshot), and promoted once in sync it keeps the cluster up when n3 is removed."""
    own_cluster.up("--snapshot-count", "50")
    own_cluster.kill("n3")
    shutil.rmtree(own_cluster.dir / "n3" / "data")
    up = own_cluster.run("cluster", "up", "--detach")
    assert "not starting n3" in up.stderr and own_cluster.pid("n3") is None
    with client_of(own_cluster) as client:
        for i in range(120):  # enough for a snapshot: the learner catches up from it
            client.put(f"lost/{i}".encode(), b"x" * 100)
    writer = Writer(own_cluster, b"lost/counter")
    writer.start()

    own_cluster.run("cluster", "add-node", "--learner", check=True)
    listed = members(own_cluster)
    assert listed["n4"]["role"] == "learner" and listed["n3"]["connected"] is False
    own_cluster.run("member", "promote", "n4", "--wait", "30", check=True)
    assert voters(own_cluster) == {"n1", "n2", "n3", "n4"}  # 3 of 4 up: still a majority
    own_cluster.run("cluster", "remove-node", "n3", check=True)

    assert voters(own_cluster) == {"n1", "n2", "n4"} == set(own_cluster.node_ids)
    writer.finish(at_least=20)
    with client_of(own_cluster) as client:
        wait_converged(own_cluster, client, own_cluster.endpoints)
        assert client.get(b"lost/119").value == b"x" * 100
    assert "snapshot loaded" in (own_cluster.dir / "n4" / "node.log").read_text()


def test_a_removed_node_stops_serving_and_membership_survives_restarts_after_compaction(
        own_cluster: Cluster) -> None:
    """A removed node must not answer as a member (its state no longer follows the cluster):
    it refuses clients and reports role 'removed' with an alarm. And a node knows the members
    from its snapshot and journal, not from its command line (thesis 4.1, 5.1): n4 joined (its
    command line, --join, says it is no member), n1 was removed with 'kv member remove' (its
    cluster.json still lists it); after the logs were compacted and every node was SIGKILLed,
    the restarted nodes follow their logs: n4 a voter, n1 removed."""
    own_cluster.up("--snapshot-count", "20")
    own_cluster.run("cluster", "add-node", check=True)
    own_cluster.run("put", "removed/k", "v", check=True)
    own_cluster.run("member", "remove", "n1", check=True)
    n1 = own_cluster.endpoint("n1")

    def removed_row() -> dict[str, Any] | None:
        row = next(r for r in own_cluster.status() if r["id"] == "n1")
        return row if row.get("role") == "removed" else None

    row = own_cluster.wait_for(removed_row, 10, "n1 to report itself removed")
    assert any(a.startswith("removed:") for a in row["alarms"])
    for args in (("get", "removed/k", "--consistency", "s"), ("put", "removed/k", "w")):
        refused = own_cluster.run(*args, "--endpoints", n1, "--timeout", "1")
        assert refused.returncode == exits.UNAVAILABLE and "removed" in refused.stderr

    with client_of(own_cluster) as client:
        for i in range(80):
            client.put(f"compact/{i}".encode(), b"v")
    for node in own_cluster.node_ids:
        assert (own_cluster.dir / node / "data" / "raft.dump").exists(), f"{node} never compacted"
        own_cluster.kill(node)
    own_cluster.up()

    assert voters(own_cluster) == {"n2", "n3", "n4"}
    own_cluster.wait_for(removed_row, 10, "n1 to be removed after a restart")
    assert next(r for r in own_cluster.status() if r["id"] == "n4")["role"] in ("leader",
                                                                              "follower")
    # A learner that never started is not in sync: promoting it is refused; removing it works.
    raft, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    own_cluster.run("member", "add", "n9", "--raft", raft, "--api", api, check=True)
    refused = own_cluster.run("member", "promote", "n9")
    assert refused.returncode == exits.ERROR and "not in sync" in refused.stderr
    own_cluster.run("member", "remove", "n9", check=True)
    assert members(own_cluster)["n9"]["role"] == "removed"
    own_cluster.run("put", "compact/after", "ok", check=True)


def test_a_session_is_answered_from_the_cache_of_a_member_that_joined_by_snapshot(
        own_cluster: Cluster) -> None:
    """Thesis 6.3 across chapter 4: a proposal applied before the change, retried after it
    with the same series id on a cluster where the new member must vote (of the voters n2,
    n3, n4 only n3 and n4 are up), is answered from the session cache, byte for byte, and
    applied once; the session store (LRU order, capacity) is identical on every replica,
    also after evictions made after the change."""
    own_cluster.up("--snapshot-count", "20", "--session-capacity", "16")
    with client_of(own_cluster) as client:
        session = client.sync_get_session()
        answer = client.sync_propose(session, ops.incr(b"cache/counter"))
        stale = copy.deepcopy(session)  # a client that never saw that answer still holds this
        for _ in range(8):
            client.sync_get_session()
        for i in range(60):  # compact the log past the proposal
            client.put(f"cache/{i}".encode(), b"v")

        own_cluster.run("cluster", "add-node", check=True)
        # The restore runs in the background (kvstore.node.snapshotter): it may still be
        # logging when the learner, holding the log, is promoted.
        own_cluster.wait_for(lambda: "snapshot loaded" in (
            own_cluster.dir / "n4" / "node.log").read_text(), 10, "n4 to load the snapshot")
        own_cluster.run("cluster", "remove-node", "n1", check=True)
        own_cluster.kill("n2")

        retried = client.sync_propose(stale, ops.incr(b"cache/counter"))
        assert retried.SerializeToString() == answer.SerializeToString()
        assert client.get(b"cache/counter").value == b"1"
        for _ in range(12):  # now 22 sessions in a store of 16: evictions after the change
            client.sync_get_session()
        live = [own_cluster.endpoint("n3"), own_cluster.endpoint("n4")]
        wait_converged(own_cluster, client, live)
        statuses = [client.status(e) for e in live]
        assert {s.sessions for s in statuses} == {16}
