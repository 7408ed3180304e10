"""Making the certificates of a cluster: a small CA, a certificate per node, client certificates.

This is what ``kv cluster up`` and ``kv cert`` use, and what an operator may call from a script;
no harness code is involved. The rules each certificate follows, so that the TLS layer can
enforce them without any code of ours:

* the CA may sign leaf certificates only (``path_length=0``): a leaf cannot mint more;
* a node's certificate names every host clients dial it by in its subject alternative names
  (IP addresses as IP entries, names as DNS entries; clients check them), and is for TLS
  servers only (extended key usage ``serverAuth``): it cannot be used as a client's;
* a client's certificate is for TLS clients only (``clientAuth``) and carries its role as a URI
  in its subject alternative names (``kvstore.auth`` says why there and what roles may do);
* keys are ECDSA P-256: a key takes about a millisecond to make, and the handshake is cheap.

Private keys are returned as unencrypted PKCS#8 PEM: whoever writes them to disk must make
them readable by their owner only (``cli.certs`` writes them mode 0600).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvstore.auth import ROLES, role_uri

CA_DAYS = 3650
"""A CA lives ten years: replacing it means reissuing every certificate of the cluster."""
LEAF_DAYS = 365
"""Node and client certificates live one year unless asked otherwise."""
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""A new certificate is valid from a little before now, so a peer whose clock is slightly
behind does not refuse it as not yet valid."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def new_ca(name: str = "kvstore CA", *, days: int = CA_DAYS,
           now: datetime.datetime | None = None) -> Issued:
    """A self-signed CA that can sign leaf certificates and nothing else."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _validity(x509.CertificateBuilder(), days, now)
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _finish(builder, key, key)


def issue_node(ca: Issued, node_id: str, hosts: Sequence[str], *, days: int = LEAF_DAYS,
               now: datetime.datetime | None = None) -> Issued:
    """A node's server certificate, valid for each of ``hosts`` (IP addresses or DNS names)."""
    if not hosts:
        raise ValueError("a node certificate needs at least one host clients dial it by")
    names = [_host_name(host) for host in dict.fromkeys(hosts)]
    return _issue(ca, node_id, names, ExtendedKeyUsageOID.SERVER_AUTH, days, now)


def issue_client(ca: Issued, name: str, role: str, *, days: int = LEAF_DAYS,
                 now: datetime.datetime | None = None) -> Issued:
    """A client certificate for ``name`` with ``role`` (``readwrite`` or ``readonly``)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")
    return _issue(ca, name, [x509.UniformResourceIdentifier(role_uri(role))],
                  ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def load(cert_pem: bytes, key_pem: bytes) -> Issued:
    """An ``Issued`` from PEM files, checked to be a certificate and its own key."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise ValueError("the private key does not belong to the certificate")
    return Issued(cert_pem, key_pem)


def check_certificates(pem: bytes) -> None:
    """Raises ``ValueError`` unless ``pem`` holds one or more PEM certificates."""
    x509.load_pem_x509_certificates(pem)


def subject_of(cert_pem: bytes) -> str:
    return x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string()


def hosts_of(cert_pem: bytes) -> list[str]:
    """The IP addresses and DNS names a certificate is valid for."""
    try:
        sans = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
            + list(sans.get_values_for_type(x509.DNSName)))


def client_problem(cert_pem: bytes, now: datetime.datetime | None = None) -> str:
    """What visibly keeps a certificate from serving as a client's: expired, not yet valid, not
    for clients; else who issued it, so the reader can check the node trusts that CA."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        return f"it expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            return "it is not a client certificate (no clientAuth usage)"
    except x509.ExtensionNotFound:
        pass
    return f"it was issued by {cert.issuer.rfc4514_string()}: does the node trust that CA?"


# -- machinery ------------------------------------------------------------------------------------

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issue(ca: Issued, common_name: str, names: list[x509.GeneralName],
           usage: x509.ObjectIdentifier, days: int, now: datetime.datetime | None) -> Issued:
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key made by kvstore.pki")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _validity(x509.CertificateBuilder(), days, now)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    return _finish(builder, key, ca_key)


def _validity(builder: x509.CertificateBuilder, days: int,
              now: datetime.datetime | None) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError("a certificate must be valid for at least one day")
    start = now or datetime.datetime.now(datetime.timezone.utc)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + datetime.timedelta(days=days)))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _finish(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey,
            signer: ec.EllipticCurvePrivateKey) -> Issued:
    cert = builder.sign(signer, hashes.SHA256())
    return Issued(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )
