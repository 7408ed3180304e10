"""Crashes: SIGKILL of the leader, SIGKILL of every node, restart from disk.

The claim under test is the project's promise (Raft thesis 6.3): an acknowledged write is never
lost, and a retried proposal is applied once, whatever happens to the nodes in between.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import errors, ops
from kvstore.client import Client
from session import Session
from tests.integration.conftest import Cluster, running_cluster

pytestmark = pytest.mark.integration

INCREMENTS = 150
"""Bounded: the stream of increments stops after this many acknowledgements..."""
STREAM_DEADLINE = 60.0
"""... or after this many seconds, whichever comes first."""


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own that snapshots often, so restarts read dump files too."""
    with running_cluster(tmp_path / "c", "--snapshot-count", "50") as started:
        yield started


def wait_converged(cluster: Cluster, client: Client, timeout: float = 30.0) -> list[str]:
    """Waits until every node has applied the same index and holds the same state digest."""

    def converged() -> list[str] | None:
        try:
            views = [client.status(e, with_digest=True) for e in cluster.endpoints]
        except errors.Unavailable:
            return None
        applied = {v.applied_index for v in views}
        digests = [v.digest for v in views]
        return digests if len(applied) == 1 and len(set(digests)) == 1 else None

    return cluster.wait_for(converged, timeout, "every replica at the same index and digest")


class IncrementStream(threading.Thread):
    """One session incrementing a counter; an unknown outcome is retried with the same series id."""

    def __init__(self, client: Client, key: bytes) -> None:
        super().__init__(daemon=True)
        self.client, self.key = client, key
        self.acknowledged = 0
        self.retries = 0
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + STREAM_DEADLINE
        session = self.client.sync_get_session()
        while self.acknowledged < INCREMENTS and time.monotonic() < deadline:
            try:
                result = self.client.sync_propose(session, ops.incr(self.key), timeout=2.0)
            except (errors.OutcomeUnknown, errors.Unavailable):
                self.retries += 1  # same session, same series id: the retry is safe
                continue
            except errors.KVError as exc:
                self.errors.append(repr(exc))
                return
            session.proposal_completed()
            self.acknowledged += 1
            assert result.number == self.acknowledged, "an increment was applied twice or lost"


def test_sigkill_of_the_leader_loses_nothing_and_applies_each_retry_once(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=10) as client:
        stream = IncrementStream(client, b"faults/leader-kill")
        stream.start()
        cluster.wait_for(lambda: stream.acknowledged >= 20 or not stream.is_alive(), 30,
                         "the stream to get going")
        victim = cluster.leader_id()
        assert victim is not None
        cluster.kill(victim)
        stream.join(STREAM_DEADLINE + 10)
        assert not stream.errors, stream.errors
        assert stream.acknowledged == INCREMENTS
        assert int(client.get(b"faults/leader-kill").value) == stream.acknowledged

        cluster.up()  # brings back only the killed node
        assert cluster.pid(victim) is not None
        wait_converged(cluster, client)


def test_restart_from_disk_after_sigkill_of_every_node(fresh_cluster: Cluster) -> None:
    cluster = fresh_cluster
    with Client(cluster.endpoints, timeout=10) as client:
        for i in range(200):
            client.put(f"disk/{i:03}".encode(), f"value-{i}".encode())
        session = client.sync_get_session()
        client.sync_propose(session, ops.incr(b"disk/once"))
        retry_copy: Session = copy.copy(session)  # what a client that lost the answer still holds
        first = client.sync_propose(retry_copy, ops.incr(b"disk/once"))
        session.proposal_completed()
        data_dirs = [cluster.dir / node / "data" for node in cluster.node_ids]
        cluster.wait_for(lambda: all((d / "raft.dump").exists() for d in data_dirs), 20,
                         "every node to write a snapshot (--snapshot-count 50)")

    for node in cluster.node_ids:
        cluster.kill(node)
    cluster.up()

    with Client(cluster.endpoints, timeout=10) as client:
        listed = client.range(b"disk/", limit=0)
        assert {kv.key: kv.value for kv in listed.kvs if kv.key != b"disk/once"} == {
            f"disk/{i:03}".encode(): f"value-{i}".encode() for i in range(200)
        }
        # The session survived the restart: its retry is answered from the cache...
        assert client.sync_propose(retry_copy, ops.incr(b"disk/once")) == first
        assert int(client.get(b"disk/once").value) == 1
        # ...and it carries on with its next series id.
        assert client.sync_propose(session, ops.incr(b"disk/once")).number == 2
        wait_converged(cluster, client)


def test_a_stuck_follower_is_flagged_by_the_leader_and_cleared_when_it_recovers(cluster: Cluster) -> None:
    """SIGSTOP a follower: the leader's status raises an alarm for it (after the 5 s the alarm
    must hold), and `kv cluster status` shows it; SIGCONT clears it. The client lists the stuck
    follower first: an attempt that hangs there must not use up the whole deadline."""
    leader = cluster.wait_for(cluster.leader_id, 20, "a leader")
    follower = next(n for n in cluster.node_ids if n != leader)
    follower_raft = cluster.spec.node(follower).raft
    endpoints = [cluster.endpoint(follower)] + [
        e for e in cluster.endpoints if e != cluster.endpoint(follower)]
    pid = cluster.pid(follower)
    assert pid is not None
    with Client(endpoints, timeout=5) as client:
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(20):
                client.put(f"stuck/{i}".encode(), b"v")

            def flagged() -> bool:
                alarms = client.status(cluster.endpoint(leader)).alarms
                return any(follower_raft in alarm for alarm in alarms)

            cluster.wait_for(flagged, 20, f"the leader to flag {follower}")
            rows = {row["id"]: row for row in cluster.status() if "id" in row}
            assert any(follower_raft in alarm for alarm in rows[leader]["alarms"]), rows[leader]
        finally:
            os.kill(pid, signal.SIGCONT)
        cluster.wait_for(lambda: not client.status(cluster.endpoint(leader)).alarms, 30,
                         "the alarm to clear")
        wait_converged(cluster, client)
