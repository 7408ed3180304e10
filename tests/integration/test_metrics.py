"""``kv node run --metrics``: three real nodes serve Prometheus's text format over HTTP, and what
they count equals what a client did, exactly; under TLS the endpoint wants a client
certificate; a public metrics address without TLS is refused in one line."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvstore import api_errors, ops, pki, results
from kvstore.client import Client
from kvstore.config import Member, NodeConfig
from kvstore.errors import Unavailable
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.proto.log_pb2 import Code
from kvstore.server import serving
from kvstore.tls import ServerTLS
from session import Session
from tests.integration.conftest import CLI, clean_env
from tests.support import free_port, stop_processes, wait_for

pytestmark = pytest.mark.integration

CLUSTER_ID = 77
SESSION_CAPACITY = 2
SNAPSHOT_COUNT = 4
"""Small, so that every node writes a snapshot during the test: a member waits for its turn
(``kvstore.node.snapshot_turns``) until its log holds twice this many entries, and the test
appends about 15 entries (proposals and session changes). With 8, a member whose turn had not
come could stay under 16 entries once the writes stopped, and never wrote one (a CI failure)."""
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Node:
    name: str
    raft: str
    api: str
    metrics: str


def scrape(address: str, context: ssl.SSLContext | None = None) -> Samples:
    """GET /metrics, parsed as Prometheus does: (name, labels) -> value."""
    scheme = "https" if context else "http"
    with urllib.request.urlopen(f"{scheme}://{address}/metrics", timeout=10,
                                context=context) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    """Three nodes started with ``kv node run --metrics``, as on three machines."""
    cluster = [Node(f"n{i}", *(f"127.0.0.1:{free_port()}" for _ in range(3))) for i in (1, 2, 3)]
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)
    procs = []
    try:
        for node in cluster:
            peers = [a for other in cluster if other != node
                     for a in ("--peer", f"{other.raft}={other.api}")]
            with open(tmp_path / f"{node.name}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [*CLI, "node", "run", "--id", node.name, "--cluster-id", str(CLUSTER_ID),
                     "--raft", node.raft, "--api", node.api, *peers,
                     "--data-dir", str(tmp_path / node.name), "--secret-file", str(secret),
                     "--session-capacity", str(SESSION_CAPACITY), "--no-fsync",
                     "--snapshot-count", str(SNAPSHOT_COUNT),
                     "--metrics", node.metrics],
                    env=clean_env(), stdout=log, stderr=subprocess.STDOUT))
        yield cluster
    finally:
        stop_processes(procs)


class Driver:
    """Raw RPCs to one node, one call per proposal, each outcome counted as the client saw it."""

    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = api_pb2_grpc.KVStub(self._channel)
        self.seen: dict[tuple[str, str], int] = {}

    def _count(self, kind: str, outcome: str) -> None:
        self.seen[(kind, outcome)] = self.seen.get((kind, outcome), 0) + 1

    def register(self, client_id: int) -> Session:
        session = Session(CLUSTER_ID, client_id)
        session.prepare_for_register()
        self._stub.RegisterSession(api_pb2.SessionRequest(session=session.to_pb()), timeout=10)
        self._count("register", "OK")
        session.prepare_for_propose()
        return session

    def unregister(self, client_id: int) -> None:
        session = Session(CLUSTER_ID, client_id)
        session.prepare_for_unregister()
        self._stub.UnregisterSession(api_pb2.SessionRequest(session=session.to_pb()), timeout=10)
        self._count("unregister", "OK")

    def propose(self, session: Session, key: bytes) -> str:
        """Sends the session's current proposal; returns the outcome's name."""
        request = api_pb2.ProposeRequest(session=session.to_pb(), command=ops.put(key, b"v"))
        try:
            self._stub.Propose(request, timeout=10)
            outcome = "OK"
        except grpc.RpcError as exc:
            metadata = dict(exc.trailing_metadata() or ())
            if api_errors.RESULT_METADATA_KEY in metadata:
                result = results.decode(metadata[api_errors.RESULT_METADATA_KEY])
                outcome = Code.Name(result.code)
            else:
                outcome = metadata.get(api_errors.REASON_METADATA_KEY, exc.code().name)
        self._count("propose", outcome)
        return outcome

    def read(self, key: bytes) -> None:
        self._stub.Read(api_pb2.ReadRequest(cluster_id=CLUSTER_ID, command=ops.get(key)),
                        timeout=10)
        self._count("read", "OK")

    def close(self) -> None:
        self._channel.close()


def test_the_scraped_counters_equal_what_the_client_did(nodes: list[Node]) -> None:
    endpoints = [n.api for n in nodes]
    with Client(endpoints, timeout=30) as admin:
        def the_leader() -> Node | None:
            try:
                leaders = [n for n in nodes if admin.status(n.api).role == "leader"]
            except Unavailable:
                return None  # not listening yet
            return leaders[0] if len(leaders) == 1 else None
        leader = wait_for(the_leader, 60, "a leader")
    follower = next(n for n in nodes if n != leader)

    def caught_up() -> list[Samples] | None:
        scraped = [scrape(n.metrics) for n in nodes]
        applied = {value(s, "kv_raft_applied_index") for s in scraped}
        commit = value(scraped[nodes.index(leader)], "kv_raft_commit_index")
        return scraped if applied == {commit} else None
    # Every node in the cluster before the first write: with a snapshot every few entries, a
    # node that connects late is sent the leader's dump instead of the entries, and a replica
    # counts only what it applied itself (a CI failure: 1 cache answer of 3 on such a node).
    def joined() -> bool:  # in the leader's term, and holding what it committed
        scraped = caught_up()
        return scraped is not None and len({value(s, "kv_raft_term") for s in scraped}) == 1
    wait_for(joined, 30, "every node to apply the leader's first entries")
    to_leader, to_follower = Driver(leader.api), Driver(follower.api)
    proposals, retried = 6, 3
    try:
        a = to_leader.register(1001)
        first = Session(a.cluster_id, a.client_id, a.series_id, a.responded_to)
        for n in range(proposals):
            assert to_leader.propose(a, b"m/%d" % n) == "OK"
            if n < retried:  # the same proposal again: answered from the cache
                assert to_leader.propose(a, b"m/%d" % n) == "OK"
            a.proposal_completed()
        # A copy of the first proposal arriving late, after the client acknowledged its answer.
        assert to_leader.propose(first, b"m/0") == "ALREADY_RESPONDED"
        to_leader.register(1002)
        to_leader.register(1003)  # capacity 2: evicts 1001, the least recently used
        assert to_leader.propose(a, b"m/evicted") == "SESSION_EXPIRED"
        to_leader.read(b"m/0")
        to_leader.unregister(1002)
        assert to_follower.propose(Session(CLUSTER_ID, 1003, 1, 0), b"m/f") == "NOT_LEADER"
    finally:
        to_leader.close()
        to_follower.close()

    scraped = wait_for(caught_up, 30, "every node to apply the leader's log")

    def snapshotted() -> list[Samples] | None:
        again = [scrape(n.metrics) for n in nodes]
        return again if all(value(s, "kv_snapshots_written_total") >= 1 for s in again) else None
    for samples in wait_for(snapshotted, 30, "every node to write a snapshot"):
        assert value(samples, "kv_snapshot_last_write_seconds") > 0
    by_node = dict(zip((n.name for n in nodes), scraped, strict=True))
    on_leader, on_follower = by_node[leader.name], by_node[follower.name]

    # Proposals by kind and outcome, where they were answered: exactly the client's counts.
    for driver, samples in ((to_leader, on_leader), (to_follower, on_follower)):
        counted = {(dict(labels)["kind"], dict(labels)["outcome"]): v
                   for (name, labels), v in samples.items() if name == "kv_proposals_total"}
        assert counted == driver.seen
    assert to_leader.seen[("propose", "OK")] == proposals + retried
    # Every replica applies the same log: the store's counts are the same on each.
    for name, samples in by_node.items():
        assert value(samples, "kv_session_cache_answers_total") == retried, name
        assert value(samples, "kv_session_evictions_total") == 1, name
        assert value(samples, "kv_sessions") == 1, name
        assert value(samples, "kv_raft_leader_changes_total") >= 1, name
        assert value(samples, "kv_node_failed") == 0, name
        assert 0 < value(samples, "kv_tick_gap_recent_seconds") <= \
            value(samples, "kv_tick_gap_max_seconds"), name
    # Each entry the leader handed to Raft has a commit latency, and each was applied in a batch.
    handed_to_raft = sum(to_leader.seen.values())
    assert value(on_leader, "kv_commit_duration_seconds_count") == handed_to_raft
    for samples in scraped:
        assert value(samples, "kv_batch_entries_sum") == handed_to_raft
        assert value(samples, "kv_apply_duration_seconds_count") == \
            value(samples, "kv_batch_entries_count")
    assert sum(value(s, "kv_raft_is_leader") for s in scraped) == 1
    assert len({value(s, "kv_raft_term") for s in scraped}) == 1
    assert value(on_leader, "kv_raft_log_entries") > 0
    assert value(on_leader, "process_cpu_seconds_total") > 0


def test_metrics_under_tls_want_a_client_certificate_from_the_cluster_ca(tmp_path: Path) -> None:
    """An embedded node (``serving``) with TLS: /metrics is HTTPS and refuses a scraper
    without a certificate."""
    ca = pki.new_ca()
    node_cert = pki.issue_node(ca, "n1", ["127.0.0.1"])
    scraper = pki.issue_client(ca, "prometheus", "readonly")
    files = {}
    for name, pem in (("ca", ca.cert_pem), ("cert", scraper.cert_pem), ("key", scraper.key_pem)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(pem)
    metrics = f"127.0.0.1:{free_port()}"
    config = NodeConfig(
        cluster_id=3, node_id="n1",
        me=Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"), peers=(),
        data_dir=tmp_path / "n1", secret="metrics-test-secret", fsync=False,
        tls=ServerTLS(node_cert.cert_pem, node_cert.key_pem, ca.cert_pem),
        metrics_address=metrics)
    with serving(config):
        trusting = ssl.create_default_context(cafile=str(files["ca"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            scrape(metrics, trusting)  # no client certificate
        trusting.load_cert_chain(str(files["cert"]), str(files["key"]))
        samples = wait_for(lambda: scrape(metrics, trusting), 10, "an HTTPS scrape")
        assert value(samples, "kv_session_capacity") > 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(metrics)  # plain HTTP to an HTTPS endpoint


def test_kv_node_run_refuses_public_metrics_without_tls(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    done = subprocess.run(
        [*CLI, "node", "run", "--id", "n1", "--cluster-id", "1",
         "--raft", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{free_port()}",
         "--data-dir", str(tmp_path / "n1"), "--secret-file", str(secret),
         "--metrics", "192.0.2.1:9100"],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "refusing to serve metrics on 192.0.2.1:9100 without TLS" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_kv_node_run_with_its_metrics_port_taken_fails_in_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        done = subprocess.run(
            [*CLI, "node", "run", "--id", "n1", "--cluster-id", "1",
             "--raft", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{free_port()}",
             "--data-dir", str(tmp_path / "n1"), "--secret-file", str(secret),
             "--metrics", address],
            env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert errors == [f"Error: cannot listen on {address} (metrics): Address already in use"]
