"""Who may call what on the client API: the role in a client's verified certificate.

The rule: on a node with TLS, every RPC is authorized before its request is looked at. The TLS
handshake has already refused any client without a certificate signed by the node's CA (see
``kvstore.tls``); this module then reads the role the certificate carries and lets the call
through only if the role grants the permission the RPC needs (``RPC_PERMISSIONS``). A call
without a verified certificate is UNAUTHENTICATED, a role without the permission
PERMISSION_DENIED; neither reaches the log, a session or the state machine. Every RPC of the
service must be listed: an RPC nobody classified stops the node at start (fail closed).

Roles: ``readwrite`` may do everything; ``readonly`` may read (linearizable or serializable),
ask for status, list the members and take a backup, but not propose, register or unregister a
session, nor add, promote or remove a member, since each of those is a log entry. A certificate may carry several roles: it gets the union of their permissions. One
with no role we know (say, signed by the same corporate CA for another service) may do nothing.

Why a URI in the subject alternative names (``kvstore:role:readonly``) and not the subject's
O or OU, as Kubernetes does with O for groups, nor a private X.509 extension:

* gRPC hands the verified URI SANs to the server as the ``peer_uri`` property of the auth
  context, so the check is a set lookup per call, with no certificate parsing in the handler;
* a SAN entry is typed and matched exactly, while a subject is a sequence of free-text
  attributes with escaping rules and multi-valued RDNs, where "which OU counts" is a question;
* a private extension needs an OID of our own and a DER parser in the node, and stock tools
  cannot add it: ``openssl req -addext subjectAltName=URI:kvstore:role:readonly`` can add ours.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

ROLE_URI_PREFIX: Final = "kvstore:role:"


class Permission(enum.Enum):
    READ = "read"
    """Read keys (through the log or from one replica), a node's status, the member list, a
    backup (which holds nothing a range read does not)."""
    WRITE = "write"
    """Add entries to the log: proposals, session registration and unregistration, member
    changes."""


ROLES: Final[Mapping[str, frozenset[Permission]]] = {
    "readwrite": frozenset({Permission.READ, Permission.WRITE}),
    "readonly": frozenset({Permission.READ}),
}

RPC_PERMISSIONS: Final[Mapping[str, Permission]] = {
    "Propose": Permission.WRITE,
    "ProposeBatch": Permission.WRITE,
    "ProposeStream": Permission.WRITE,
    "RegisterSession": Permission.WRITE,
    "UnregisterSession": Permission.WRITE,
    "MemberAdd": Permission.WRITE,
    "MemberPromote": Permission.WRITE,
    "MemberRemove": Permission.WRITE,
    "Read": Permission.READ,
    "Status": Permission.READ,
    "MemberList": Permission.READ,
    "Snapshot": Permission.READ,
}
"""The permission each RPC of ``kvstore.KV`` needs. A new RPC must be added here."""


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: the gRPC status code's name and a one-line message."""

    code: Literal["UNAUTHENTICATED", "PERMISSION_DENIED"]
    message: str


class UnclassifiedRpc(LookupError):
    """An RPC of the service that ``RPC_PERMISSIONS`` does not list."""


def role_uri(role: str) -> str:
    """The subject alternative name URI that grants ``role``."""
    return ROLE_URI_PREFIX + role


def required_permission(method: str) -> Permission:
    """The permission ``method`` needs; raises ``UnclassifiedRpc`` for an unlisted RPC."""
    try:
        return RPC_PERMISSIONS[method]
    except KeyError:
        raise UnclassifiedRpc(
            f"the RPC {method} has no permission in kvstore.auth.RPC_PERMISSIONS: every RPC "
            "must say which role may call it") from None


def roles_of(uris: Iterable[bytes | str]) -> list[str]:
    """The role names in a certificate's URI subject alternative names, in order."""
    found = []
    for uri in uris:
        text = uri.decode("utf-8", "replace") if isinstance(uri, bytes) else uri
        if text.startswith(ROLE_URI_PREFIX):
            found.append(text[len(ROLE_URI_PREFIX):])
    return found


def permissions_of(roles: Iterable[str]) -> frozenset[Permission]:
    granted: frozenset[Permission] = frozenset()
    for role in roles:
        granted |= ROLES.get(role, frozenset())
    return granted


def check(method: str, permission: Permission,
          auth_context: Mapping[str, Iterable[bytes]]) -> Refusal | None:
    """``None`` if the caller described by gRPC's ``auth_context`` may call ``method``; else
    how to refuse it."""
    names = list(auth_context.get("x509_common_name", ()))
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"] or not (
            names or auth_context.get("x509_subject")):
        return Refusal("UNAUTHENTICATED",
                       "a verified client certificate is required (pass --cert and --key)")
    roles = roles_of(auth_context.get("peer_uri", ()))
    if permission in permissions_of(roles):
        return None
    who = names[0].decode("utf-8", "replace") if names else "the client"
    held = f"role {', '.join(roles)}" if roles else f"no {ROLE_URI_PREFIX}* role"
    return Refusal(
        "PERMISSION_DENIED",
        f"permission denied: {who} ({held}) may not call {method}, which needs the "
        f"{permission.value} permission (a readwrite certificate); nothing was applied")
