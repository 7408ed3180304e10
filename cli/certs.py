"""Certificate files on disk: a local cluster's (``DIR/tls/``), and which ones a command uses.

Layout of ``DIR/tls/`` (``kv cluster up`` makes it for a new cluster; directory mode 0700)::

    ca.pem, ca-key.pem                           the cluster's CA; its key issues more
    <node>.pem, <node>-key.pem                   each node's API certificate (its API host in
                                                 its subject alternative names)
    client-readwrite.pem, client-readwrite-key.pem   a client that may read and write
    client-readonly.pem, client-readonly-key.pem     a client that may only read

Every private key is written mode 0600, before anything points at it. ``kv cert`` writes the
same kinds of files into any directory, for clusters on several machines.

The rule for a command's client files (``client_tls``): each of ``--cacert``, ``--cert`` and
``--key`` (or ``KV_CACERT``, ``KV_CERT``, ``KV_KEY``) that is given is used; one that is not
comes from the local cluster's directory when the endpoints are that cluster's nodes (from its
``cluster.json``, or named by ``--endpoints``); with none at all the client speaks plaintext,
which only a loopback node without TLS accepts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cli.files import write_atomic
from kvstore.config import is_loopback, split_address

if TYPE_CHECKING:  # cryptography and grpc are slow to import; `kv --help` needs neither
    from kvstore.pki import Issued
    from kvstore.tls import ClientTLS

CA_NAME = "ca"
LOCAL_CLIENT_ROLES = ("readwrite", "readonly")


def write_issued(issued: Issued, cert_file: Path, key_file: Path, *,
                 exclusive: bool = False) -> None:
    """The key first (mode 0600), then the certificate (0644) that makes the pair usable."""
    write_atomic(key_file, issued.key_pem, mode=0o600, exclusive=exclusive)
    write_atomic(cert_file, issued.cert_pem, mode=0o644, exclusive=exclusive)


def pair(directory: Path, name: str) -> tuple[Path, Path]:
    """``(NAME.pem, NAME-key.pem)`` in ``directory``."""
    return directory / f"{name}.pem", directory / f"{name}-key.pem"


def node_hosts(api_address: str) -> list[str]:
    """The hosts a node's certificate names: its API host, and ``localhost`` on loopback."""
    host, _ = split_address(api_address)
    return [host, "localhost"] if is_loopback(api_address) and host != "localhost" else [host]


class ClusterCerts:
    """The certificate files of one local cluster, in ``directory`` (``DIR/tls``)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def ca_file(self) -> Path:
        return pair(self.dir, CA_NAME)[0]

    def node_files(self, node_id: str) -> tuple[Path, Path]:
        return pair(self.dir, node_id)

    def client_files(self, role: str) -> tuple[Path, Path]:
        return pair(self.dir, f"client-{role}")

    def create(self, nodes: Iterable[tuple[str, str]]) -> None:
        """A new CA, a certificate for each ``(node id, API address)``, and one client
        certificate per role.

        They all live as long as the CA: a local cluster is a development cluster on loopback,
        and one that stopped working after a year would be a surprise, not a safeguard.
        """
        from kvstore import pki

        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = pki.new_ca(f"kvstore local cluster CA ({self.dir.parent.name})")
        write_issued(ca, *pair(self.dir, CA_NAME))
        for node_id, api_address in nodes:
            self._issue_node(ca, node_id, api_address)
        for role in LOCAL_CLIENT_ROLES:
            client = pki.issue_client(ca, f"kv-{role}", role, days=pki.CA_DAYS)
            write_issued(client, *self.client_files(role))

    def issue_node(self, node_id: str, api_address: str) -> tuple[Path, Path]:
        """A certificate for a node added later (``kv cluster add-node``), signed by this
        cluster's CA; returns its certificate and key files."""
        return self._issue_node(self._ca(), node_id, api_address)

    def node_args(self, node_id: str) -> list[str]:
        """``kv node run`` options that make the node serve its API over mutual TLS."""
        cert, key = self.node_files(node_id)
        return ["--cert", str(cert), "--key", str(key), "--cacert", str(self.ca_file)]

    def client_tls(self, role: str = "readwrite") -> ClientTLS:
        from kvstore.tls import ClientTLS

        return ClientTLS.load(self.ca_file, *self.client_files(role))

    def _ca(self) -> Issued:
        cert_file, key_file = pair(self.dir, CA_NAME)
        from kvstore import pki

        return pki.load(cert_file.read_bytes(), key_file.read_bytes())

    def _issue_node(self, ca: Issued, node_id: str, api_address: str) -> tuple[Path, Path]:
        from kvstore import pki

        files = self.node_files(node_id)
        issued = pki.issue_node(ca, node_id, node_hosts(api_address), days=pki.CA_DAYS)
        write_issued(issued, *files)
        return files


def client_tls(cacert: Path | None, cert: Path | None, key: Path | None,
               local: ClusterCerts | None) -> ClientTLS | None:
    """The client files a command uses (the rule in the module docstring)."""
    if local is not None:
        local_cert, local_key = local.client_files("readwrite")
        if cert is None and key is None:
            cert, key = local_cert, local_key
        cacert = cacert or local.ca_file
    if cacert is None and cert is None and key is None:
        return None
    from kvstore.tls import ClientTLS

    return ClientTLS.load(cacert, cert, key)
