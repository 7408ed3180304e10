"""TLS and roles on the client API, against a real cluster made by ``kv cluster up`` (TLS on).

One claim per test, each tried through the client library, through the ``kv`` command line and,
where the library could hide it, through a raw gRPC channel: a client without a certificate,
with one from another CA, with an expired one, and a read-only client writing are refused with
their own error and exit code, and nothing reaches the log: every node's commit index, applied
index and state digest are the same before and after.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cli import exits
from cli.certs import pair, write_issued
from kvstore import errors, ops, pki
from kvstore.client import Client
from kvstore.proto import api_pb2, api_pb2_grpc
from kvstore.tls import ClientTLS, open_channel
from session import new_noop_session, new_session
from tests.integration.conftest import CLI, Cluster, clean_env
from tests.support import free_port, stop_processes, wait_for

pytestmark = pytest.mark.integration

REFUSED_FAST = 5.0
"""Seconds a refused call may take at most: far below the command's 10 s, so the refusal was
recognised, not retried until the deadline."""


@dataclass(frozen=True)
class Credentials:
    """One client's files, for the library (``tls``) and for the CLI (``args``)."""

    tls: ClientTLS | None
    args: tuple[str, ...]


@pytest.fixture(scope="module")
def bad(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Credentials]:
    """Credentials a node must refuse, by name, plus the local read-only ones."""
    out = tmp_path_factory.mktemp("certs")
    certs = Path(cluster.dir) / "tls"
    ca_file = certs / "ca.pem"
    ca = pki.load(*(p.read_bytes() for p in pair(certs, "ca")))
    made = {
        "other-ca": pki.issue_client(pki.new_ca("another CA"), "mallory", "readwrite"),
        "expired": pki.issue_client(ca, "old", "readwrite", days=1,
                                    now=datetime.datetime.now(datetime.timezone.utc)
                                    - datetime.timedelta(days=10)),
    }
    found: dict[str, Credentials] = {}
    for name, issued in made.items():
        cert, key = pair(out, name)
        write_issued(issued, cert, key)
        found[name] = Credentials(ClientTLS.load(ca_file, cert, key),
                                  ("--cert", str(cert), "--key", str(key)))
    found["no-certificate"] = Credentials(ClientTLS.load(ca_file, None, None),
                                          ("--cacert", str(ca_file)))
    found["plaintext"] = Credentials(None, ())
    ro_cert, ro_key = pair(certs, "client-readonly")
    found["readonly"] = Credentials(ClientTLS.load(ca_file, ro_cert, ro_key),
                                    ("--cert", str(ro_cert), "--key", str(ro_key)))
    return found


REFUSED = ["no-certificate", "plaintext", "other-ca", "expired"]


@pytest.fixture(scope="module")
def admin(cluster: Cluster) -> Iterator[Client]:
    with cluster.client(timeout=10) as client:
        yield client


def positions(cluster: Cluster, admin: Client) -> list[tuple[int, int, str]]:
    """Every node's (commit index, applied index, digest), once the cluster is quiet: the
    same on every node, and nothing left to apply."""
    def settled() -> list[tuple[int, int, str]] | None:
        views = [admin.status(e, with_digest=True) for e in cluster.endpoints]
        seen = [(v.commit_index, v.applied_index, v.digest) for v in views]
        return seen if len(set(seen)) == 1 and seen[0][0] == seen[0][1] else None
    found: list[tuple[int, int, str]] = wait_for(settled, 20, "the nodes to agree")
    return found


@pytest.fixture
def unchanged_log(cluster: Cluster, admin: Client) -> Iterator[None]:
    """Asserts that the test added nothing to any node's log."""
    admin.put(b"tls/marker", b"before")  # the pooled session is open before the baseline
    before = positions(cluster, admin)
    yield
    assert positions(cluster, admin) == before, "a refused client got something into the log"


def refused_quickly(action: Callable[[], object], error: type[errors.KVError]) -> str:
    started = time.monotonic()
    with pytest.raises(error) as caught:
        action()
    assert time.monotonic() - started < REFUSED_FAST, "retried until the deadline"
    assert type(caught.value).exit_code == exits.ACCESS_DENIED
    return str(caught.value)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", REFUSED)
def test_a_client_without_an_acceptable_certificate_gets_nothing_done_via_the_library(
        cluster: Cluster, bad: dict[str, Credentials], unchanged_log: None, name: str) -> None:
    with Client(cluster.endpoints, timeout=10, tls=bad[name].tls) as client:
        for action in (lambda: client.put(b"tls/lib", name.encode()),
                       lambda: client.get(b"tls/marker"),
                       client.sync_get_session,
                       lambda: client.status(cluster.endpoints[0])):
            refused_quickly(action, errors.Unauthenticated)


@pytest.mark.parametrize("name", REFUSED)
def test_a_client_without_an_acceptable_certificate_gets_nothing_done_via_the_cli(
        cluster: Cluster, bad: dict[str, Credentials], unchanged_log: None, name: str,
        tmp_path: Path) -> None:
    commands = [("put", "tls/cli", name), ("get", "tls/marker")]
    if name in ("plaintext", "no-certificate"):
        # As from another machine: else the local cluster's files fill in what is missing.
        endpoints: tuple[str, ...] = ("--dir", str(tmp_path / "elsewhere"),
                                      "--endpoints", ",".join(cluster.endpoints))
    else:
        endpoints = ()
        commands.append(("cluster", "status"))
    hints = {"plaintext": "requires TLS", "no-certificate": "requires a client certificate",
             "other-ca": "issued by CN=another CA", "expired": "it expired on"}
    for command in commands:
        done = cluster.run(*endpoints, *bad[name].args, "--timeout", "10", *command)
        assert done.returncode == exits.ACCESS_DENIED, (command, done.stderr)
        assert hints[name] in one_error_line(done), command


@pytest.mark.parametrize("name", REFUSED)
def test_the_node_refuses_them_at_the_handshake_whatever_the_client(
        cluster: Cluster, bad: dict[str, Credentials], unchanged_log: None, name: str) -> None:
    """Not the library's doing: a raw channel gets no RPC through either, not even Status."""
    for endpoint in cluster.endpoints:
        with open_channel(endpoint, bad[name].tls) as channel:
            stub = api_pb2_grpc.KVStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Status(api_pb2.StatusRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            noop = new_noop_session(1)
            with pytest.raises(grpc.RpcError):
                stub.Propose(api_pb2.ProposeRequest(session=noop.to_pb(),
                                                    command=ops.put(b"tls/raw", b"x")), timeout=5)


def test_the_node_log_says_why_it_refused_an_expired_certificate(
        cluster: Cluster, bad: dict[str, Credentials]) -> None:
    assert cluster.run(*bad["expired"].args, "get", "tls/marker").returncode == exits.ACCESS_DENIED
    logs = [Path(cluster.dir) / node / "node.log" for node in cluster.node_ids]
    wait_for(lambda: any("certificate has expired" in log.read_text() for log in logs), 10,
             "a node's log to name the expired certificate")


def test_a_readonly_client_reads_but_writes_nothing_via_the_library(
        cluster: Cluster, admin: Client, bad: dict[str, Credentials]) -> None:
    with Client(cluster.endpoints, timeout=10, tls=bad["readonly"].tls) as reader:
        admin.put(b"tls/marker", b"before")
        assert reader.get(b"tls/marker").value == b"before"  # through the log: an entry
        assert reader.get(b"tls/marker", consistency="serializable").found
        assert reader.status(cluster.endpoints[0]).cluster_id == admin.cluster_id
        session = admin.sync_get_session()  # a session the reader did not open
        before = positions(cluster, admin)
        message = refused_quickly(lambda: reader.put(b"tls/ro", b"x"), errors.PermissionDenied)
        assert "kv-readonly (role readonly) may not call RegisterSession" in message
        refused_quickly(reader.sync_get_session, errors.PermissionDenied)
        refused_quickly(lambda: reader.sync_propose(session, ops.incr(b"tls/ro")),
                        errors.PermissionDenied)
        refused_quickly(lambda: reader.sync_close_session(session), errors.PermissionDenied)
        refused_quickly(lambda: reader.sync_propose(reader.get_noop_session(),
                                                    ops.put(b"tls/ro", b"x")),
                        errors.PermissionDenied)
        assert positions(cluster, admin) == before, "a read-only client wrote to the log"
        admin.sync_close_session(session)
    assert not admin.get(b"tls/ro").found


def test_a_readonly_client_is_permission_denied_on_the_wire(
        cluster: Cluster, admin: Client, bad: dict[str, Credentials], unchanged_log: None) -> None:
    with open_channel(cluster.endpoints[0], bad["readonly"].tls) as channel:
        stub = api_pb2_grpc.KVStub(channel)
        assert stub.Status(api_pb2.StatusRequest(), timeout=5).cluster_id == admin.cluster_id
        register = new_session(admin.cluster_id)
        register.prepare_for_register()
        noop = new_noop_session(admin.cluster_id)
        raw_propose = channel.unary_unary("/kvstore.KV/Propose")
        for call in (
                lambda: stub.RegisterSession(api_pb2.SessionRequest(session=register.to_pb()),
                                             timeout=5),
                lambda: stub.Propose(api_pb2.ProposeRequest(
                    session=noop.to_pb(), command=ops.put(b"tls/ro", b"x")), timeout=5),
                lambda: raw_propose(b"\xff\xff", timeout=5)):  # refused before it is parsed
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_readonly_client_writes_nothing_via_the_cli(
        cluster: Cluster, admin: Client, bad: dict[str, Credentials]) -> None:
    ro = bad["readonly"].args
    admin.put(b"tls/marker", b"before")
    assert cluster.run(*ro, "get", "tls/marker", check=True).stdout == "tls/marker\nbefore\n"
    before = positions(cluster, admin)
    cluster.run(*ro, "cluster", "status", check=True)
    cluster.run(*ro, "member", "list", check=True)
    for command in (("put", "tls/ro", "x"), ("incr", "tls/ro"), ("delete", "tls/marker"),
                    ("session", "open", "--session", str(Path(cluster.dir) / "ro.session")),
                    ("member", "add", "n9", "--raft", f"127.0.0.1:{free_port()}",
                     "--api", f"127.0.0.1:{free_port()}")):
        done = cluster.run(*ro, *command)
        assert done.returncode == exits.ACCESS_DENIED, (command, done.stderr)
        assert "permission denied" in one_error_line(done)
    assert positions(cluster, admin) == before, "a read-only client wrote to the log"


def test_the_local_cluster_files_are_found_by_every_command(cluster: Cluster) -> None:
    assert cluster.run("put", "tls/found", "yes", check=True).stdout == "OK\n"
    env_only = clean_env(KV_ENDPOINTS=",".join(cluster.endpoints),
                         KV_CACERT=str(Path(cluster.dir) / "tls" / "ca.pem"),
                         KV_CERT=str(Path(cluster.dir) / "tls" / "client-readwrite.pem"),
                         KV_KEY=str(Path(cluster.dir) / "tls" / "client-readwrite-key.pem"))
    done = subprocess.run([*CLI, "get", "tls/found"], env=env_only, capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "tls/found\nyes\n"), done.stderr


# -- the README's "three machines with certificates", on loopback ---------------------------------


def _kv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env or clean_env(), capture_output=True, text=True,
                          timeout=60, check=False)


def test_three_nodes_started_by_hand_with_kv_cert_files(tmp_path: Path) -> None:
    """The how-to's commands, with 127.0.0.1 in place of three machines' addresses."""
    pki_dir = tmp_path / "pki"
    assert _kv("cert", "ca", "--pki", str(pki_dir)).returncode == 0
    nodes = [(f"n{i}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for i in (1, 2, 3)]
    for name, _, api in nodes:
        done = _kv("cert", "node", "--pki", str(pki_dir), "--name", name,
                   "--host", api.split(":")[0])
        assert done.returncode == 0, done.stderr
    for name, role in (("admin", "readwrite"), ("dashboard", "readonly")):
        assert _kv("cert", "client", "--pki", str(pki_dir), "--name", name,
                   "--role", role).returncode == 0
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)
    procs = []
    try:
        for name, raft, api in nodes:
            peers = [a for other, r, p in nodes if other != name for a in ("--peer", f"{r}={p}")]
            procs.append(subprocess.Popen(
                [*CLI, "node", "run", "--id", name, "--cluster-id", "42", "--raft", raft,
                 "--api", api, *peers, "--data-dir", str(tmp_path / name),
                 "--secret-file", str(secret), "--cert", str(pki_dir / f"{name}.pem"),
                 "--key", str(pki_dir / f"{name}-key.pem"), "--cacert", str(pki_dir / "ca.pem")],
                env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        as_user = clean_env(KV_ENDPOINTS=",".join(api for _, _, api in nodes),
                            KV_CACERT=str(pki_dir / "ca.pem"), KV_CERT=str(pki_dir / "admin.pem"),
                            KV_KEY=str(pki_dir / "admin-key.pem"))
        wait_for(lambda: _kv("--timeout", "30", "put", "howto", "works",
                             env=as_user).returncode == 0, 60,
                 "the hand-started cluster to take a write")
        assert _kv("get", "howto", env=as_user).stdout == "howto\nworks\n"
        as_dashboard = {**as_user, "KV_CERT": str(pki_dir / "dashboard.pem"),
                        "KV_KEY": str(pki_dir / "dashboard-key.pem")}
        assert _kv("get", "howto", env=as_dashboard).stdout == "howto\nworks\n"
        assert _kv("put", "howto", "no", env=as_dashboard).returncode == exits.ACCESS_DENIED
    finally:
        stop_processes(procs)
