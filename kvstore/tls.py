"""TLS on the client API: the files both ends load, and what a refused handshake means.

The rules, and where each is enforced:

* A node serves its API in plaintext only on a loopback address (``NodeConfig`` refuses any
  other without ``tls``), as its Raft port never runs without the cluster secret.
* With TLS, a node requires a client certificate signed by the CA it trusts (mutual TLS, as
  etcd's ``--client-cert-auth``; here it cannot be turned off). The handshake itself refuses a
  missing certificate, one from another CA, an expired or not yet valid one, and a certificate
  not meant for clients (a node's): no byte of a request is decrypted, so nothing can reach the
  log. What the certificate may do is ``kvstore.auth``'s business.
* A client checks the node's certificate against its CA and the host name it dialled.

One thing gRPC's Python API cannot do is ask for a client certificate without requiring it, so
a refused client never gets a gRPC status: the node closes the connection right after the TLS
handshake, which the client sees as UNAVAILABLE "Socket closed", the same as a node that went
away. ``explain_refusal`` tells the two apart by shaking hands again with the same files using
Python's ``ssl`` module: a node that accepts us sends its HTTP/2 settings at once; one that
refuses us closes the connection without a byte. The client library then raises
``Unauthenticated`` instead of retrying until its deadline. The node's log says which check
failed (gRPC logs "Handshake failed ... certificate has expired").

``ClientTLS`` is shared by the blocking client (``kvstore.client``) and any asyncio client:
``channel_credentials()`` serves ``grpc.secure_channel`` and ``grpc.aio.secure_channel`` alike.
X.509 is ``kvstore.pki``'s business, imported only once TLS is used (cryptography is slow to
import, and ``kv --help`` needs none of it).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore.config import ConfigError, split_address

HTTP2_ALPN = "h2"


@dataclass(frozen=True)
class ServerTLS:
    """A node's certificate and key, and the CA whose client certificates it accepts."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    cert_file: Path | None = None

    @classmethod
    def load(cls, cert_file: Path, key_file: Path, ca_file: Path) -> ServerTLS:
        """Reads and checks the three files; ``ConfigError`` names the first bad one."""
        cert_pem, key_pem = _read_pair(cert_file, key_file)
        ca_pem = _read_ca(ca_file)
        return cls(cert_pem, key_pem, ca_pem, cert_file)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                           root_certificates=self.ca_pem, require_client_auth=True)

    def host_warning(self, api_address: str) -> str | None:
        """A warning if the certificate does not name the API's host, which clients dial and
        check (none for a wildcard address such as 0.0.0.0, which no client dials)."""
        from kvstore import pki

        host, _ = split_address(api_address)
        if host in ("0.0.0.0", "::"):
            return None
        named = pki.hosts_of(self.cert_pem)
        if host in named:
            return None
        return (f"the API certificate {self.cert_file or ''} names "
                f"{', '.join(named) or 'no host'}, not {host}: clients that dial {host} will not "
                "trust it")


@dataclass(frozen=True)
class ClientTLS:
    """What a client presents and trusts: a CA bundle (``None``: the system's roots) and a
    certificate with its key (``None``: none, which a node refuses; useful only to diagnose)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    @classmethod
    def load(cls, ca_file: Path | None, cert_file: Path | None,
             key_file: Path | None) -> ClientTLS:
        """Reads and checks the files; ``ConfigError`` names the first bad one."""
        if (cert_file is None) != (key_file is None):
            raise ConfigError("a client certificate and its key go together: give both "
                              "--cert and --key, or neither")
        cert_pem = key_pem = None
        if cert_file is not None and key_file is not None:
            cert_pem, key_pem = _read_pair(cert_file, key_file)
        ca_pem = _read_ca(ca_file) if ca_file is not None else None
        return cls(ca_file, cert_file, key_file, ca_pem, cert_pem, key_pem)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC's credentials for these files, for sync and aio channels alike."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem,
                                            private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def describe(self) -> str:
        """Our certificate, and what visibly keeps it from serving (a hint: the node decides)."""
        if self.cert_pem is None:
            return "no certificate"
        from kvstore import pki

        return (f"{pki.subject_of(self.cert_pem)} ({self.cert_file}): "
                f"{pki.client_problem(self.cert_pem)}")


def open_channel(endpoint: str, tls: ClientTLS | None,
                 options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A blocking channel to ``endpoint``: TLS with ``tls``, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(endpoint, options=options)
    return grpc.secure_channel(endpoint, tls.channel_credentials(), options=options)


def explain_refusal(endpoint: str, tls: ClientTLS | None, timeout: float) -> str | None:
    """Why ``endpoint`` closed our connection, if our TLS settings are the reason; else None.

    Called after a call failed with a closed connection. It shakes hands again with Python's
    ``ssl`` and the same files: a node that accepts the client sends HTTP/2 bytes at once; one
    that does not closes the connection without a word (see the module docstring).
    """
    host, port = split_address(endpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols([HTTP2_ALPN])
    if tls is None:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        if tls.ca_pem is not None:
            context.load_verify_locations(cadata=tls.ca_pem.decode("ascii"))
        else:
            context.load_default_certs()
        if tls.cert_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as conn:
            first = conn.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return (f"{endpoint}: the node's certificate is not trusted: {exc.verify_message} "
                "(check --cacert, and that the node's certificate names this host)")
    except ssl.SSLError as exc:
        if exc.reason == "WRONG_VERSION_NUMBER" and tls is not None:
            return (f"{endpoint} does not speak TLS (a plaintext node on loopback): "
                    "drop --cacert, --cert and --key")
        return None  # a plaintext client at a plaintext node: not a TLS refusal
    except OSError:
        return None  # unreachable, reset, timed out: not a refusal we can name
    if first:
        return None  # the node talks to us: the failure was something else
    if tls is None:
        return (f"{endpoint} requires TLS and a client certificate: pass --cacert, --cert and "
                "--key (or set KV_CACERT, KV_CERT and KV_KEY)")
    if tls.cert_pem is None:
        return (f"{endpoint} requires a client certificate: pass --cert and --key "
                "(or set KV_CERT and KV_KEY)")
    return f"{endpoint} refused the client certificate {tls.describe()} (the node's log says why)"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc


def _read_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    from kvstore import pki

    cert_pem, key_pem = _read(cert_file), _read(key_file)
    try:
        pki.check_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_file}: not a PEM certificate ({exc})") from exc
    try:
        pki.load(cert_pem, key_pem)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_file}: not the private key of {cert_file} ({exc})") from exc
    return cert_pem, key_pem


def _read_ca(ca_file: Path) -> bytes:
    from kvstore import pki

    ca_pem = _read(ca_file)
    try:
        pki.check_certificates(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"{ca_file}: not a PEM CA certificate ({exc})") from exc
    return ca_pem
