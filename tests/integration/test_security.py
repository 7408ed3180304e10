"""PySyncObj defects D1 and D2: a node never runs code sent to its raft port, and listens on
loopback only.

D1: PySyncObj unpickles the first frame a peer sends. Without a cluster secret, a crafted pickle
runs arbitrary code; the control test shows this payload does so against a bare PySyncObj, so a
pass of the real test means the secret stopped it, not that the payload was harmless.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import zlib
from pathlib import Path

import pytest
from pysyncobj import SyncObj, SyncObjConf

from tests.integration.conftest import Cluster
from tests.support import free_port

pytestmark = pytest.mark.integration


class MarkerPickle:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def attack(port: int, marker: Path) -> None:
    """Sends the pickle as PySyncObj frames (length-prefixed, compressed and raw), then waits
    until the node closes the connection, so it has read and judged every byte."""
    payload = pickle.dumps(MarkerPickle(marker), protocol=2)
    for body in (zlib.compress(payload), payload):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(struct.pack("i", len(body)) + body)
            conn.settimeout(5)
            try:
                while conn.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError, socket.timeout):
                pass



def test_control_a_bare_pysyncobj_runs_the_payload(tmp_path: Path) -> None:
    marker = tmp_path / "control-marker"
    port = free_port()
    bare = SyncObj(f"127.0.0.1:{port}", [f"127.0.0.1:{free_port()}"],
                   SyncObjConf(bindAddress=f"127.0.0.1:{port}"))
    try:
        Cluster.wait_for(lambda: _accepts(port), 10, "the bare node to listen")
        attack(port, marker)
        Cluster.wait_for(marker.exists, 10, "the payload to run on a node without a secret")
    finally:
        bare.destroy()


def test_a_crafted_pickle_sent_to_the_raft_port_is_not_executed(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for node in cluster.spec.nodes:
        attack(int(node.raft.rsplit(":", 1)[1]), marker)
    assert not marker.exists(), "a node unpickled bytes from an unauthenticated peer"
    with cluster.client(timeout=10) as client:
        # Every node still serves: roles settle (an election may be under way) and writes commit.
        cluster.wait_for(
            lambda: sorted(client.status(e).role for e in cluster.endpoints)
            == ["follower", "follower", "leader"], 20, "a leader and two followers")
        assert client.put(b"security/after-attack", b"fine").code == 0


def test_ports_listen_on_loopback_127_0_0_1_only(cluster: Cluster) -> None:
    for node in cluster.spec.nodes:
        for address in (node.raft, node.api):
            port = int(address.rsplit(":", 1)[1])
            assert _accepts(port, "127.0.0.1"), f"{address} does not accept"
            assert not _accepts(port, "127.0.0.2"), f"{address} also listens beyond 127.0.0.1"


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
