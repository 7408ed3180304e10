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
from tests import support
from tests.integration.conftest import Cluster, running_cluster

pytestmark = pytest.mark.integration

WRITERS = 4
INCREMENTS = 150
"""Bounded: each stream of increments stops after this many acknowledgements..."""
STREAM_DEADLINE = 60.0
"""... or after this many seconds, whichever comes first."""
ATTEMPT_TIMEOUT = 0.2
"""Each proposal's deadline: below the 0.4 s election timeout, so a proposal caught by the
crash gives up while no new leader can exist yet, and the stream retries it itself (the client
library would otherwise retry it inside ``sync_propose``, where the test cannot see it)."""
KILL_AFTER = 20
"""The leader is killed once every stream has this many acknowledged increments."""


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


def find_leader(client: Client, endpoints: list[str]) -> tuple[str, int]:
    """The leader's API endpoint and pid, asked of the nodes through the client library (a
    ``kv`` subprocess would take about a second: the streams would be done by then)."""

    def leader() -> tuple[str, int] | None:
        for endpoint in endpoints:
            try:
                status = client.status(endpoint, timeout=0.5)
            except errors.Unavailable:
                continue
            if status.role == "leader":
                return endpoint, status.pid
        return None

    found: tuple[str, int] = support.wait_for(leader, 10, "a leader")
    return found


class IncrementStream(threading.Thread):
    """One session incrementing its own counter; an unknown outcome is retried with the same
    series id. Records which series ids needed a retry, and which one is in flight."""

    def __init__(self, client: Client, key: bytes) -> None:
        super().__init__(daemon=True)
        self.client, self.key = client, key
        self.acknowledged = 0
        self.retries = 0
        self.retried_series: set[int] = set()
        self.in_flight: int | None = None
        """The series id of the proposal sent and not yet answered, if any."""
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + STREAM_DEADLINE
        session = self.client.sync_get_session()
        while self.acknowledged < INCREMENTS and time.monotonic() < deadline:
            self.in_flight = session.series_id
            try:
                result = self.client.sync_propose(session, ops.incr(self.key),
                                                  timeout=ATTEMPT_TIMEOUT)
            except (errors.OutcomeUnknown, errors.Unavailable):
                self.retries += 1  # same session, same series id: the retry is safe
                self.retried_series.add(session.series_id)
                continue
            except errors.KVError as exc:
                self.errors.append(repr(exc))
                return
            finally:
                self.in_flight = None
            session.proposal_completed()
            self.acknowledged += 1
            if result.number != self.acknowledged:
                self.errors.append(f"increment {self.acknowledged} answered {result.number}: "
                                   "an increment was applied twice or lost")
                return


def test_sigkill_of_the_leader_during_writes_loses_nothing_and_applies_each_retry_once(
        cluster: Cluster) -> None:
    """Four sessions increment their own counters; the leader is SIGKILLed while they run.
    Proposals caught by the crash are retried with their series ids across the election, and
    each is applied once: every counter equals its stream's acknowledged increments."""
    with cluster.client(timeout=10) as client:
        streams = [IncrementStream(client, f"faults/leader-kill/{n}".encode())
                   for n in range(WRITERS)]
        for stream in streams:
            stream.start()
        cluster.wait_for(lambda: all(s.acknowledged >= KILL_AFTER or not s.is_alive()
                                     for s in streams), 30, "every stream to get going")
        endpoint, pid = find_leader(client, cluster.endpoints)
        at_kill = [(s.is_alive(), s.acknowledged, s.retries, s.in_flight) for s in streams]
        os.kill(pid, signal.SIGKILL)
        for stream in streams:
            stream.join(STREAM_DEADLINE + 10)

        assert all(alive and acknowledged < INCREMENTS for alive, acknowledged, _, _ in at_kill), \
            f"the kill must land while every stream is writing: {at_kill}"
        assert not [s.errors for s in streams if s.errors]
        assert [s.acknowledged for s in streams] == [INCREMENTS] * WRITERS
        caught = [series for (_, _, _, series), s in zip(at_kill, streams, strict=True)
                  if series is not None and series in s.retried_series]
        assert caught, ("no proposal in flight at the kill was retried across it: "
                        f"in flight {[a[3] for a in at_kill]}, "
                        f"retried {[sorted(s.retried_series) for s in streams]}")
        assert sum(s.retries for s in streams) > sum(retries for _, _, retries, _ in at_kill)
        print(f"\nat the kill (alive, acknowledged, retries, in flight): {at_kill}; "
              f"retries after: {[s.retries for s in streams]}, caught: {caught}")
        for stream in streams:
            assert int(client.get(stream.key).value) == INCREMENTS, stream.key

        victim = next(n for n in cluster.node_ids if cluster.endpoint(n) == endpoint)
        cluster.wait_for(lambda: cluster.pid(victim) is None, 15, f"{victim} to be gone")
        cluster.up()  # brings back only the killed node
        assert cluster.pid(victim) is not None
        wait_converged(cluster, client)


def test_restart_from_disk_after_sigkill_of_every_node(fresh_cluster: Cluster) -> None:
    cluster = fresh_cluster
    with cluster.client(timeout=10) as client:
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

    with cluster.client(timeout=10) as client:
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
    with cluster.client(endpoints, timeout=5) as client:
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
