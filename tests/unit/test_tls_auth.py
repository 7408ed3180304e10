"""The pure parts of TLS and authorization: certificates made, roles read, files chosen, and the
rule that a node's API is plaintext on loopback only.

``tests/integration/test_tls.py`` runs the same rules against real nodes.
"""

from __future__ import annotations

import datetime
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cli import exits, main
from cli.certs import ClusterCerts, client_tls
from cli.cluster_dir import ClusterDir
from cli.node_cmd import read_tls
from cli.settings import Settings
from kvstore import auth, pki
from kvstore.auth import Permission
from kvstore.config import ConfigError, Member, NodeConfig
from kvstore.proto import api_pb2
from kvstore.tls import ServerTLS, explain_refusal
from tests.support import free_port

UTC = datetime.timezone.utc


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# -- who may call what (kvstore.auth) --------------------------------------------------------------


def test_every_rpc_of_the_service_has_a_permission() -> None:
    """Fail closed: a new RPC without a permission stops the node at start (and fails here)."""
    for method in api_pb2.DESCRIPTOR.services_by_name["KV"].methods:
        assert isinstance(auth.required_permission(method.name), Permission), method.name
    with pytest.raises(auth.UnclassifiedRpc, match="RPC_PERMISSIONS"):
        auth.required_permission("Defragment")


def test_each_log_entry_needs_write_and_reads_need_read() -> None:
    assert {m for m, p in auth.RPC_PERMISSIONS.items() if p is Permission.WRITE} == {
        "Propose", "ProposeBatch", "ProposeStream", "RegisterSession", "UnregisterSession",
        "MemberAdd", "MemberPromote", "MemberRemove"}
    assert {m for m, p in auth.RPC_PERMISSIONS.items() if p is Permission.READ} == {
        "Read", "Status", "MemberList", "Snapshot"}


def _context(*uris: str, name: bytes = b"alice") -> dict[str, list[bytes]]:
    return {"transport_security_type": [b"ssl"], "x509_common_name": [name],
            "peer_uri": [uri.encode() for uri in uris]}


def test_readonly_reads_but_may_not_write() -> None:
    readonly = _context(auth.role_uri("readonly"))
    assert auth.check("Read", Permission.READ, readonly) is None
    assert auth.check("Status", Permission.READ, readonly) is None
    refusal = auth.check("Propose", Permission.WRITE, readonly)
    assert refusal is not None and refusal.code == "PERMISSION_DENIED"
    assert "alice (role readonly) may not call Propose" in refusal.message


def test_readwrite_may_do_everything() -> None:
    readwrite = _context(auth.role_uri("readwrite"))
    for method, permission in auth.RPC_PERMISSIONS.items():
        assert auth.check(method, permission, readwrite) is None


def test_roles_add_up_and_unknown_uris_grant_nothing() -> None:
    both = _context(auth.role_uri("readonly"), auth.role_uri("readwrite"))
    assert auth.check("Propose", Permission.WRITE, both) is None
    strangers = _context("spiffe://example/alice", "kvstore:role:admin", "kvstore:roles:readwrite")
    for method, permission in auth.RPC_PERMISSIONS.items():
        refused = auth.check(method, permission, strangers)
        assert refused is not None and refused.code == "PERMISSION_DENIED", method
    assert auth.roles_of([b"kvstore:role:admin", b"other"]) == ["admin"]


def test_no_verified_certificate_is_unauthenticated() -> None:
    for context in ({}, {"transport_security_type": [b"insecure"]},
                    {"transport_security_type": [b"ssl"]}):
        refused = auth.check("Read", Permission.READ, context)
        assert refused is not None and refused.code == "UNAUTHENTICATED", context


# -- certificates (kvstore.pki) --------------------------------------------------------------------


def test_the_ca_signs_leaves_only() -> None:
    ca = pki.new_ca("test CA").certificate
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0


def test_a_node_certificate_names_its_hosts_and_serves_only() -> None:
    ca = pki.new_ca()
    node = pki.issue_node(ca, "n1", ["10.0.0.1", "n1.example", "10.0.0.1"]).certificate
    node.verify_directly_issued_by(ca.certificate)
    sans = _sans(node)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["n1.example"]
    assert _usages(node) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(ValueError):
        pki.issue_node(ca, "n1", [])


def test_a_client_certificate_carries_its_role_and_is_for_clients_only() -> None:
    ca = pki.new_ca()
    client = pki.issue_client(ca, "dashboard", "readonly").certificate
    client.verify_directly_issued_by(ca.certificate)
    assert _sans(client).get_values_for_type(x509.UniformResourceIdentifier) == [
        "kvstore:role:readonly"]
    assert _usages(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(ValueError, match="unknown role"):
        pki.issue_client(ca, "x", "admin")


def test_validity_starts_a_little_before_now() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    cert = pki.issue_client(pki.new_ca(now=now), "a", "readwrite", days=2, now=now).certificate
    assert cert.not_valid_before_utc == now - pki.CLOCK_SKEW
    assert cert.not_valid_after_utc == now + datetime.timedelta(days=2)


def test_load_refuses_a_key_of_another_certificate() -> None:
    ca = pki.new_ca()
    a, b = pki.issue_client(ca, "a", "readwrite"), pki.issue_client(ca, "b", "readwrite")
    assert pki.load(a.cert_pem, a.key_pem) == a
    with pytest.raises(ValueError, match="does not belong"):
        pki.load(a.cert_pem, b.key_pem)


# -- a local cluster's files (cli.certs) -----------------------------------------------------------


def test_a_tls_cluster_dir_has_every_file_with_keys_mode_0600(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path / "c")
    spec = cluster.create(2, tls=True)
    assert spec.tls and cluster.load() == spec
    certs = cluster.certs
    assert _mode(certs.dir) == 0o700
    keys = sorted(certs.dir.glob("*-key.pem"))
    assert [k.name for k in keys] == ["ca-key.pem", "client-readonly-key.pem",
                                      "client-readwrite-key.pem", "n1-key.pem", "n2-key.pem"]
    assert all(_mode(k) == 0o600 for k in keys)
    ca = x509.load_pem_x509_certificate(certs.ca_file.read_bytes())
    for node in spec.nodes:
        cert = x509.load_pem_x509_certificate(certs.node_files(node.id)[0].read_bytes())
        cert.verify_directly_issued_by(ca)
        assert node.api.split(":")[0] in [str(i) for i in _sans(cert).get_values_for_type(
            x509.IPAddress)]
    assert "--cacert" in certs.node_args("n1")
    assert not ClusterDir(tmp_path / "plain").create(1).tls
    assert not (tmp_path / "plain" / "tls").exists()


def test_a_node_added_later_gets_a_certificate_from_the_same_ca(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path)
    cluster.create(1, tls=True)
    cert_file, key_file = cluster.certs.issue_node("n4", "127.0.0.1:4444")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(
        cluster.certs.ca_file.read_bytes()))
    assert _mode(key_file) == 0o600
    ServerTLS.load(cert_file, key_file, cluster.certs.ca_file)  # a usable pair


def test_client_files_given_win_and_the_rest_come_from_the_local_cluster(tmp_path: Path) -> None:
    certs = ClusterCerts(tmp_path / "tls")
    certs.create([("n1", "127.0.0.1:1")])
    rw_cert, rw_key = certs.client_files("readwrite")
    ro_cert, ro_key = certs.client_files("readonly")
    assert client_tls(None, None, None, None) is None  # plaintext
    local = client_tls(None, None, None, certs)
    assert local is not None and (local.ca_file, local.cert_file) == (certs.ca_file, rw_cert)
    mine = client_tls(None, ro_cert, ro_key, certs)
    assert mine is not None and (mine.ca_file, mine.cert_file) == (certs.ca_file, ro_cert)
    no_cert = client_tls(certs.ca_file, None, None, None)
    assert no_cert is not None and no_cert.cert_pem is None
    with pytest.raises(ConfigError, match="go together"):
        client_tls(None, ro_cert, None, certs)
    with pytest.raises(ConfigError, match="not the private key"):
        client_tls(None, ro_cert, rw_key, certs)


def test_endpoints_of_the_local_cluster_get_its_files_even_when_named(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path / "c")
    spec = cluster.create(2, tls=True)
    for endpoints in ([], spec.endpoints[:1], spec.endpoints):
        tls = Settings(dir=cluster.path, endpoints=list(endpoints)).client_tls()
        assert tls is not None and tls.cert_file == cluster.certs.client_files("readwrite")[0]
    assert Settings(dir=cluster.path, endpoints=[spec.endpoints[0], "10.0.0.1:2379"]
                    ).client_tls() is None
    assert Settings(dir=tmp_path / "none", endpoints=spec.endpoints).client_tls() is None


# -- plaintext on loopback only (kvstore.config) ---------------------------------------------------


def _config(api: str, tls: ServerTLS | None) -> NodeConfig:
    return NodeConfig(cluster_id=1, node_id="n1", me=Member("127.0.0.1:7001", api), peers=(),
                      data_dir=Path("/nonexistent"), secret="s", tls=tls)


def test_a_plaintext_api_is_refused_off_loopback(tmp_path: Path) -> None:
    _config("127.0.0.1:9001", None)
    _config("localhost:9001", None)
    for exposed in ("0.0.0.0:9001", "10.1.2.3:9001", "[::]:9001"):
        with pytest.raises(ConfigError, match="without TLS"):
            _config(exposed, None)
    certs = ClusterCerts(tmp_path)
    certs.create([("n1", "10.1.2.3:9001")])
    _config("10.1.2.3:9001", ServerTLS.load(*certs.node_files("n1"), certs.ca_file))


def test_node_run_on_a_public_address_without_tls_exits_3(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1) is no address of this machine: should the rule ever go, the node
    fails to bind it rather than serve anything, and the test fails on the message."""
    (tmp_path / "secret").write_text("s3cret\n")
    done = subprocess.run(
        [sys.executable, "-m", "cli", "node", "run", "--id", "n1", "--cluster-id", "1",
         "--raft", f"127.0.0.1:{free_port()}", "--api", "192.0.2.1:2379",
         "--data-dir", str(tmp_path / "data"), "--secret-file", str(tmp_path / "secret")],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == exits.INVALID_INPUT, done.stderr
    assert done.stderr.startswith(
        "Error: refusing to serve the client API on 192.0.2.1:2379 without TLS")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_node_run_needs_all_three_tls_files(tmp_path: Path) -> None:
    assert read_tls(None, None, None) is None
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    for partial in ((cert, None, None), (cert, key, None), (None, None, ca)):
        with pytest.raises(ConfigError, match="TLS needs all of --cert, --key and --cacert"):
            read_tls(*partial)


def test_a_node_warns_when_its_certificate_does_not_name_its_api_host(tmp_path: Path) -> None:
    certs = ClusterCerts(tmp_path)
    certs.create([("n1", "10.1.2.3:9001")])
    tls = ServerTLS.load(*certs.node_files("n1"), certs.ca_file)
    assert tls.host_warning("10.1.2.3:9001") is None
    assert tls.host_warning("0.0.0.0:9001") is None
    warning = tls.host_warning("10.9.9.9:9001")
    assert warning is not None and "names 10.1.2.3, not 10.9.9.9" in warning


def test_kv_cert_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki_dir = str(tmp_path / "pki")
    assert main.run(["cert", "ca", "--pki", pki_dir]) == exits.OK
    assert main.run(["cert", "client", "--pki", pki_dir, "--name", "ops"]) == exits.OK
    key = (tmp_path / "pki" / "ops-key.pem").read_bytes()
    capsys.readouterr()
    for again in (["cert", "ca", "--pki", pki_dir],
                  ["cert", "client", "--pki", pki_dir, "--name", "ops", "--role", "readonly"]):
        assert main.run(again) == exits.INVALID_INPUT
        assert "never overwritten" in capsys.readouterr().err
    assert (tmp_path / "pki" / "ops-key.pem").read_bytes() == key
    assert _mode(tmp_path / "pki" / "ops-key.pem") == 0o600
    assert main.run(["cert", "node", "--pki", str(tmp_path / "none"), "--name", "n1",
                     "--host", "h"]) == exits.INVALID_INPUT
    assert "kv cert ca --pki" in capsys.readouterr().err


def test_explaining_a_closed_port_names_nothing() -> None:
    """Only a node that shook hands and then hung up is a refusal; no node is not."""
    assert explain_refusal(f"127.0.0.1:{free_port()}", None, 1.0) is None


def test_a_plaintext_client_at_a_plaintext_node_is_no_tls_refusal() -> None:
    """A connection that closed between a plaintext client and a plaintext node (a node killed
    mid-call) is not blamed on TLS: the probe's handshake meets plaintext, as the client does.
    (It was once reported as "does not speak TLS: drop --cacert", ending a kv check run.)"""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        assert explain_refusal(f"127.0.0.1:{port}", None, 1.0) is None
    finally:
        server.stop(None)
