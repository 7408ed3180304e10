"""An impostor on the Raft port without the cluster secret gets nothing done, and learns nothing.

The attacker knows everything but the secret: the members' Raft addresses, the cluster id, the
current term and commit index (all public through Status), and the wire format (PySyncObj's
frames, sealed as ``kvstore.node.wire_crypto`` seals them). It

* runs a real PySyncObj ``SyncObj`` (password "wrong") that claims to *be* a member (the highest
  Raft address, so PySyncObj dials every other member) and lists the members as its peers, with
  a term of 10**9 and its election forced on, so it asks for votes whenever it can;
* forges PySyncObj frames by hand, encrypted with the wrong key: the key exchange, the claim
  to be that member, a RequestVote and an AppendEntries at term 10**9 that carries a real
  ``put`` entry for ``_n_apply`` and commits it.

With the wrong secret nothing of that may have any effect: the leader and the term stay the same
over the attack window (no election is caused), nothing is committed or applied (commit index,
applied index, digest and key count unchanged, the forged key absent), and the attacker never
receives one frame it could decrypt (its partners stay disconnected, its log holds only
PySyncObj's initial entry, a forged connection gets no byte back).

The control runs the same impostor with the RIGHT secret against a throwaway cluster: there it
does get connected (``partner_node_status_server_*`` == 2) and receives frames, and a forged key
exchange gets an answer, so the detectors above can see a connection when there is one.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.transport import TCPTransport

from cli.cluster_dir import ClusterDir
from kvstore import encode_entry, errors, ops
from kvstore.client import Client
from kvstore.node.wire_crypto import WireCrypto
from kvstore.proto import api_pb2
from session import Session
from tests.integration.conftest import Cluster
from tests.support import free_port

pytestmark = pytest.mark.integration

WRONG_SECRET = "wrong"
HUGE_TERM = 10**9
ATTACK_SECONDS = 3.0
"""The attack window: long enough for several forced elections of the impostor (every 0.2-0.3 s)
and several of the cluster's election timeouts (0.4-1.4 s)."""
CONTROL_DEADLINE = 10.0
STATUS_EVERY = 0.2
FORGED_KEY = b"wrong-secret/forged"
_REGULAR_COMMAND = 0  # pysyncobj.syncobj._COMMAND_TYPE.REGULAR



class RecordingTransport(TCPTransport):
    """PySyncObj's TCP transport, counting what reaches the impostor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.tcp_connected: Counter[str] = Counter()
        """Outgoing TCP connections established, per member: the attack reached its port."""
        self.received: Counter[str] = Counter()
        """Frames received and decrypted, per member (or "incoming"): anything learned."""
        super().__init__(*args, **kwargs)

    def _onOutgoingConnected(self, conn: Any) -> None:
        node = self._connToNode(conn)
        self.tcp_connected[node.address if node is not None else "?"] += 1
        super()._onOutgoingConnected(conn)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:
        node = self._connToNode(conn)
        self.received[node.address if node is not None else "?"] += 1
        super()._onOutgoingMessageReceived(conn, message)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        self.received["incoming"] += 1
        super()._onIncomingMessageReceived(conn, message)


class Impostor(SyncObj):
    """A plain PySyncObj node that claims the Raft address ``claimed`` of a real member."""

    def __init__(self, claimed: str, members: list[str], password: str) -> None:
        self.applied: list[tuple[bytes, bytes]] = []
        self.crypto = WireCrypto(password)
        conf = SyncObjConf(
            password=password,
            bindAddress=f"127.0.0.1:{free_port()}",  # the claimed port is the real member's
            autoTick=False,  # ticked by the test: no thread to leak, every loop bounded
            connectionRetryTime=0.1, connectionTimeout=1.0,
            raftMinTimeout=0.2, raftMaxTimeout=0.3, appendEntriesPeriod=0.05,
            dynamicMembershipChange=False,
        )
        super().__init__(claimed, members, conf, transportClass=RecordingTransport)

    @property
    def encryptor(self) -> WireCrypto:
        """Seals frames the way our nodes do (as ``RaftNode.encryptor``)."""
        return self.crypto

    @replicated
    def set(self, key: bytes, value: bytes) -> None:
        self.applied.append((key, value))

    @property
    def transport(self) -> RecordingTransport:
        return self._SyncObj__transport  # type: ignore[attr-defined,no-any-return]

    def campaign_with_huge_term(self) -> None:
        """Asks for votes at term HUGE_TERM+ whenever its election timer fires, connected or not."""
        self._SyncObj__setCurrentTerm(HUGE_TERM, None)  # type: ignore[attr-defined]
        self._SyncObj__connectedToAnyone = lambda: True  # type: ignore[attr-defined]

    def partner_states(self) -> dict[str, int]:
        status = self.getStatus()
        prefix = "partner_node_status_server_"
        return {k[len(prefix):]: v for k, v in status.items() if k.startswith(prefix)}


@dataclass
class Observed:
    """What the test saw of the real cluster and of the impostor during the attack window."""

    terms: set[int] = field(default_factory=set)
    leaders: set[str] = field(default_factory=set)
    commit_indexes: set[int] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    partner_states: set[int] = field(default_factory=set)
    impostor_terms: set[int] = field(default_factory=set)
    impostor_log_lengths: set[int] = field(default_factory=set)
    impostor_leaders: set[object] = field(default_factory=set)
    status_polls: int = 0


def drive(impostor: Impostor, seconds: float, every: Callable[[], bool | None] | None = None,
          until: Callable[[], bool] | None = None) -> bool:
    """Ticks the impostor for at most ``seconds``; calls ``every`` about every STATUS_EVERY s.
    Returns whether ``until`` became true (False when there is none)."""
    deadline = time.monotonic() + seconds
    next_poll = 0.0
    while time.monotonic() < deadline:
        impostor.doTick(0.02)
        if until is not None and until():
            return True
        if every is not None and time.monotonic() >= next_poll:
            every()
            next_poll = time.monotonic() + STATUS_EVERY
    return False


# --------------------------------------------------------------------------------------------
# Hand-forged PySyncObj frames (tcp_connection.TcpConnection.send, byte for byte)
# --------------------------------------------------------------------------------------------


@functools.cache
def sealer(password: str) -> WireCrypto:
    """One per password, like one sending process: its counter keeps increasing."""
    return WireCrypto(password)


def frame(password: str, message: object, rand_key: bytes | None = None) -> bytes:
    if rand_key is not None:
        message = (rand_key, message)
    data = zlib.compress(pickle.dumps(message), 3)
    data = sealer(password).encrypt_at_time(data, int(time.monotonic()))
    return struct.pack("i", len(data)) + data


def forged_attack(password: str, claimed: str, cluster_id: int, last_index: int, last_term: int) -> bytes:
    """Key exchange, "I am <claimed>", a vote request and an append that commits a put."""
    guessed_key = os.urandom(32)  # the node's half of the key exchange, which we never get
    put = encode_entry(Session(cluster_id=cluster_id), ops.put(FORGED_KEY, b"applied by an impostor"))
    entry_data = bytes([_REGULAR_COMMAND]) + pickle.dumps((0, (put,)))  # _n_apply is method id 0
    return b"".join((
        frame(password, os.urandom(32)),
        frame(password, claimed, guessed_key),
        frame(password, {"type": "request_vote", "term": HUGE_TERM, "last_log_index": HUGE_TERM,
                         "last_log_term": HUGE_TERM}, guessed_key),
        frame(password, {"type": "append_entries", "term": HUGE_TERM, "commit_index": last_index + 1,
                         "entries": [(entry_data, last_index + 1, HUGE_TERM)],
                         "prevLogIdx": last_index, "prevLogTerm": last_term}, guessed_key),
    ))


def send_and_listen(address: str, payload: bytes, timeout: float = 5.0) -> tuple[int, bool]:
    """Sends ``payload`` on a fresh connection; returns (bytes the node sent back, whether it
    closed the connection) once it answers or closes, or after ``timeout``."""
    host, port = address.rsplit(":", 1)
    received, closed = 0, False
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(payload)
        while time.monotonic() < deadline:
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = conn.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += len(chunk)
            break  # an answer: the node decrypted our first frame
    return received, closed


# --------------------------------------------------------------------------------------------
# The real cluster
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[Client]:
    with cluster.client(timeout=10) as c:
        yield c


def views(cluster: Cluster, client: Client, *, with_digest: bool = False) -> list[api_pb2.NodeStatus]:
    return [client.status(e, with_digest=with_digest, timeout=5) for e in cluster.endpoints]


def settled(cluster: Cluster, client: Client) -> list[api_pb2.NodeStatus]:
    """Waits for one leader that every node follows, at one term, every replica caught up."""

    def check() -> list[api_pb2.NodeStatus] | None:
        try:
            now = views(cluster, client, with_digest=True)
        except errors.Unavailable:
            return None
        one_leader = sorted(v.role for v in now) == ["follower", "follower", "leader"]
        agreed = len({(v.term, v.leader_raft_address, v.commit_index, v.applied_index, v.digest)
                      for v in now}) == 1
        return now if one_leader and agreed and all(v.has_quorum for v in now) else None

    return Cluster.wait_for(check, 20, "a settled cluster")


def test_an_impostor_with_the_wrong_secret_gets_nothing_done(cluster: Cluster, client: Client) -> None:
    for i in range(5):
        client.put(b"wrong-secret/before/%d" % i, b"v")
    before = settled(cluster, client)
    base = before[0]
    members = [node.raft for node in cluster.spec.nodes]
    claimed = max(members)  # PySyncObj dials members whose address sorts lower: all the others
    seen = Observed()

    def poll() -> None:
        for view in views(cluster, client):
            seen.terms.add(view.term)
            seen.leaders.add(view.leader_raft_address)
            seen.commit_indexes.add(view.commit_index)
            seen.pids.add(view.pid)
        seen.status_polls += 1

    def watch_impostor() -> None:
        seen.partner_states.update(impostor.partner_states().values())
        status = impostor.getStatus()
        seen.impostor_terms.add(status["raft_term"])
        seen.impostor_log_lengths.add(status["log_len"])
        seen.impostor_leaders.add(status["leader"])

    def observe() -> None:
        poll()
        watch_impostor()

    impostor = Impostor(claimed, members, WRONG_SECRET)
    try:
        impostor.campaign_with_huge_term()
        forged = [send_and_listen(member, forged_attack(WRONG_SECRET, claimed, base.cluster_id,
                                                        base.commit_index, base.term))
                  for member in members]
        drive(impostor, ATTACK_SECONDS, every=observe)
        forged += [send_and_listen(member, forged_attack(WRONG_SECRET, claimed, base.cluster_id,
                                                         base.commit_index, base.term))
                   for member in members]
        watch_impostor()
        tcp_connected, received = dict(impostor.transport.tcp_connected), dict(impostor.transport.received)
        applied = list(impostor.applied)
    finally:
        impostor.destroy()
    poll()
    after = views(cluster, client, with_digest=True)
    report = (f"cluster during the attack: terms {seen.terms}, leaders {seen.leaders}, commit "
              f"{seen.commit_indexes} ({seen.status_polls} polls); impostor: partner states "
              f"{seen.partner_states}, terms {sorted(seen.impostor_terms)[:3]}..., log lengths "
              f"{seen.impostor_log_lengths}, TCP connections {tcp_connected}, frames received "
              f"{received}; forged connections (bytes back, closed) {forged}")
    print(report)

    # The attack did reach the members: the impostor's TCP connections were accepted, and it
    # ran elections at its huge term.
    others = set(members) - {claimed}
    assert set(tcp_connected) == others and all(n > 0 for n in tcp_connected.values()), report
    assert max(seen.impostor_terms) > HUGE_TERM, f"the impostor never campaigned: {report}"
    assert seen.status_polls >= 5, report

    # No election was caused; the leader and the term stayed; nothing was committed or applied.
    assert seen.terms == {base.term}, report
    assert seen.leaders == {base.leader_raft_address}, report
    assert seen.commit_indexes == {base.commit_index}, report
    assert seen.pids == {v.pid for v in before}, report
    for old, new in zip(before, after, strict=True):
        assert (new.role, new.term, new.leader_raft_address) == (old.role, old.term, old.leader_raft_address)
        assert (new.commit_index, new.applied_index) == (old.commit_index, old.applied_index)
        assert (new.digest, new.keys, new.sessions) == (old.digest, old.keys, old.sessions)
    for endpoint in cluster.endpoints:
        with cluster.client([endpoint]) as local:
            assert not local.get(FORGED_KEY, consistency="serializable").found

    # The impostor learned nothing: no frame from a member ever decrypted, no partner connected,
    # its log holds only PySyncObj's initial entry, it never saw a leader, applied nothing; and
    # every forged connection was closed without one byte in answer.
    assert received == {}, report
    assert seen.partner_states == {0}, report
    assert seen.impostor_log_lengths == {1}, report
    assert seen.impostor_leaders == {None}, report
    assert applied == []
    assert all(answer == (0, True) for answer in forged), report

    # The cluster still works.
    assert client.put(b"wrong-secret/after", b"v").code == 0
    assert client.get(b"wrong-secret/after").value == b"v"


def test_control_with_the_right_secret_the_impostor_is_connected(own_cluster: Cluster) -> None:
    """The same impostor and the same forged key exchange, with the cluster's own secret, on a
    throwaway cluster (the impostor then really disturbs it)."""
    own_cluster.up()
    secret = ClusterDir(own_cluster.dir).secret_file.read_text(encoding="utf-8").strip()
    members = [node.raft for node in own_cluster.spec.nodes]
    claimed = max(members)

    # A forged key exchange with the right secret is answered (with the node's half of the key).
    answered, _ = send_and_listen(min(members), frame(secret, os.urandom(32)))
    assert answered > 0, "a node did not answer a key exchange made with the right secret"

    impostor = Impostor(claimed, members, secret)
    try:
        connected = drive(impostor, CONTROL_DEADLINE,
                          until=lambda: 2 in impostor.partner_states().values())
        states = impostor.partner_states()
        received = dict(impostor.transport.received)
    finally:
        impostor.destroy()
    assert connected, f"the impostor with the right secret never connected: {states}"
    assert received, "connected but received nothing"
