"""Network faults through per-link proxies (``kvstore.check.proxy``): first the proxy on its own,
then on a real 3-node cluster.

The nodes run in this process (``kvstore.server.serving``, as in ``examples/embedded_node.py``)
and dial each peer through its own ``LinkProxy``: ``NodeConfig.dial_via`` gives the node a proxy
address to connect to while the peer keeps its real raft address as its identity. So cutting a
proxy is a network partition, with no root and no firewall.

Claims: traffic really goes through the proxies; an isolated leader cannot commit and steps
down, the majority elects a leader and commits, and after healing all replicas converge to the
same state (Raft thesis 3.4-3.5: electing a leader and committing an entry both need a
majority); a delay on the links shows in the latency of every write.
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TypeVar

import pytest

from kvstore import ops, results
from kvstore.check.proxy import LinkProxy, Network
from kvstore.config import Member, NodeConfig
from kvstore.entry import encode_entry
from kvstore.node import KVNode, NotApplied, OutcomeUnknown
from kvstore.proto.log_pb2 import Code
from kvstore.server import serving
from session import new_noop_session
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

T = TypeVar("T")

CLUSTER_ID = 7
ELECTION_DEADLINE = 10.0
"""An election takes 0.4-1.4 s (driven timer profile); a reconnect up to 5 s (PySyncObj's
``connectionRetryTime``) after a link comes back."""
CONVERGE_DEADLINE = 20.0
LINK_DELAY = 0.2
"""Below the election timeout (0.4 s), so a delayed cluster keeps its leader."""




# -- the proxy on its own, in front of an echo server ---------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[str]:
    """An echo server on 127.0.0.1; yields its address."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def dial(proxy: LinkProxy) -> socket.socket:
    host, port = proxy.address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(5)  # every read below is bounded
    return sock


def read(sock: socket.socket, size: int) -> bytes:
    """Reads ``size`` bytes, or fewer if the connection closes."""
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received


def echoed(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read(sock, len(data))


def test_a_link_proxy_forwards_until_cut_and_again_once_healed(echo: str) -> None:
    with LinkProxy(echo) as proxy:
        with dial(proxy) as first:
            assert echoed(first, b"ping") == b"ping"
            proxy.cut()
            assert first.recv(1) == b"", "cut() left a connection open"
        with dial(proxy) as while_cut:  # accepted, then closed at once
            assert while_cut.recv(1) == b""
        proxy.heal()
        with dial(proxy) as healed:
            assert echoed(healed, b"pong") == b"pong"
            healed.shutdown(socket.SHUT_WR)  # a half-close passes through: the echo server ends
            assert healed.recv(1) == b""
        stats = proxy.stats()
    assert (stats.connections, stats.refused, stats.open) == (2, 1, 0)
    assert stats.bytes_to_target == stats.bytes_from_target == 8
    assert stats.bytes_forwarded == 16


def test_a_link_proxy_delays_each_direction_and_keeps_order(echo: str) -> None:
    with LinkProxy(echo) as proxy, dial(proxy) as sock:
        proxy.set_delay(0.1)
        started = time.monotonic()
        for part in (b"one,", b"two,", b"three"):
            sock.sendall(part)
        assert read(sock, 13) == b"one,two,three"
        # There and back: each chunk waits 0.1 s in each direction.
        assert time.monotonic() - started >= 0.2


# -- a cluster whose every link goes through a proxy ---------------------------------------------


@dataclass
class ProxiedCluster:
    network: Network
    nodes: dict[str, KVNode]
    """By raft address."""

    def leader(self, among: list[str]) -> str | None:
        """The node of ``among`` that leads with every node of ``among`` following it."""
        for address in among:
            if self.nodes[address].is_leader() and all(
                    self.nodes[a].leader_address() == address for a in among):
                return address
        return None

    def wait_for_leader(self, among: list[str]) -> str:
        return wait_for(lambda: self.leader(among), ELECTION_DEADLINE, f"a leader among {among}")

    def wait_converged(self) -> None:
        """Waits until every replica has applied the same index and holds the same state."""
        def converged() -> bool:
            views = [node.status(with_digest=True) for node in self.nodes.values()]
            return len({(v.applied_index, v.digest) for v in views}) == 1
        wait_for(converged, CONVERGE_DEADLINE, "every replica at the same index and digest")


def put(node: KVNode, key: bytes, value: bytes, timeout: float = 5.0) -> None:
    """Proposes ``put`` on ``node`` (which must lead) and checks that it was applied."""
    entry = encode_entry(new_noop_session(CLUSTER_ID), ops.put(key, value))
    assert results.decode(node.propose(entry, timeout)).code == Code.OK


def found(node: KVNode, key: bytes) -> bool:
    return node.read_local(ops.get(key)).found


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ProxiedCluster]:
    """Three nodes, each link through its own proxy; everything stops when the test ends.

    Only the node with the larger raft address dials (PySyncObj's ``_shouldConnect``), so the
    nodes start in ascending address order: every dial then finds its peer listening, instead of
    being refused and retried 5 s later.
    """
    members = sorted((Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
                      for _ in range(3)), key=lambda m: m.raft_address)
    with Network([m.raft_address for m in members]) as network, ExitStack() as running:
        nodes = {}
        for index, me in enumerate(members):
            config = NodeConfig(
                cluster_id=CLUSTER_ID,
                node_id=f"n{index + 1}",
                me=me,
                peers=tuple(m for m in members if m != me),
                data_dir=tmp_path / f"n{index + 1}",
                secret="proxy-test-secret",
                dial_via=network.dial_via(me.raft_address),
            )
            nodes[me.raft_address] = running.enter_context(serving(config))
        yield ProxiedCluster(network, nodes)


def test_raft_traffic_goes_through_the_proxies(cluster: ProxiedCluster) -> None:
    addresses = list(cluster.nodes)
    leader = cluster.wait_for_leader(addresses)
    before = cluster.network.stats()
    for i in range(20):
        put(cluster.nodes[leader], b"k%d" % i, b"v%d" % i)
    cluster.wait_converged()
    after = cluster.network.stats()

    for a, b in combinations(addresses, 2):
        dialer, target = max(a, b), min(a, b)
        assert after[(dialer, target)].connections >= 1, f"{dialer} never dialed {target} via proxy"
        assert after[(dialer, target)].bytes_forwarded > 0
        # PySyncObj opens one connection per pair, from the larger address: the other proxy idles.
        assert after[(target, dialer)].connections == 0
        if leader in (a, b):
            grew = after[(dialer, target)].bytes_forwarded - before[(dialer, target)].bytes_forwarded
            assert grew > 0, f"the writes did not cross the link {dialer} -> {target}"


def test_an_isolated_leader_cannot_commit_and_the_majority_carries_on(
        cluster: ProxiedCluster) -> None:
    addresses = list(cluster.nodes)
    old = cluster.wait_for_leader(addresses)
    put(cluster.nodes[old], b"before", b"1")
    cluster.wait_converged()

    cluster.network.isolate(old)
    stale = cluster.nodes[old]
    commit_before = stale.status().commit_index
    with pytest.raises((NotApplied, OutcomeUnknown)):
        put(stale, b"lost", b"never committed", timeout=1.0)
    assert stale.status().commit_index == commit_before, "an isolated leader committed"

    majority = [a for a in addresses if a != old]
    new = cluster.wait_for_leader(majority)
    for i in range(10):
        put(cluster.nodes[new], b"after%d" % i, b"2")
    # With no answer from a majority for leaderFallbackTimeout (2 s), the old leader steps down.
    wait_for(lambda: not stale.is_leader(), ELECTION_DEADLINE, "the isolated leader to step down")
    assert stale.status().applied_index < cluster.nodes[new].status().applied_index

    cluster.network.heal()
    cluster.wait_converged()
    # One leader for all three again, not necessarily ``new``: PySyncObj has no PreVote (thesis
    # 9.6), so the node coming back may campaign with a higher term and depose it.
    cluster.wait_for_leader(addresses)
    for node in cluster.nodes.values():
        assert found(node, b"before") and found(node, b"after9")
        assert not found(node, b"lost"), "the isolated leader's uncommitted write survived"


def test_a_delay_on_the_links_slows_every_write(cluster: ProxiedCluster) -> None:
    leader = cluster.nodes[cluster.wait_for_leader(list(cluster.nodes))]

    def write_latency(key: bytes) -> float:
        started = time.monotonic()
        put(leader, key, b"x")
        return time.monotonic() - started

    baseline = [write_latency(b"fast%d" % i) for i in range(5)]
    cluster.network.delay(LINK_DELAY)
    delayed = [write_latency(b"slow%d" % i) for i in range(5)]
    # A commit needs an append to reach a follower and its answer to come back: two delays.
    assert min(delayed) >= 2 * LINK_DELAY, delayed
    assert statistics.median(baseline) < LINK_DELAY, baseline
    cluster.network.heal()
    assert statistics.median([write_latency(b"healed%d" % i) for i in range(5)]) < LINK_DELAY
