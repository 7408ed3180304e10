"""How a node is configured: its addresses, its peers, its data directory and the cluster secret."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvstore.limits import DEFAULT_SESSION_CAPACITY

if TYPE_CHECKING:
    from kvstore.tls import ServerTLS

DEFAULT_SNAPSHOT_COUNT = 5000


class ConfigError(ValueError):
    """A configuration that must not run (for example a public address without a secret)."""


class CannotRestart(ConfigError):
    """A data directory the node cannot restart from safely (``kvstore.node.recovery``): one
    line that names the file and the way out."""


@dataclass(frozen=True)
class Member:
    """One node as the others know it: where Raft talks to it and where clients do."""

    raft_address: str
    api_address: str
    name: str = ""
    """The node id operators know it by (``n1``); optional for peers."""


@dataclass(frozen=True)
class NodeConfig:
    cluster_id: int
    node_id: str
    me: Member
    peers: tuple[Member, ...]
    data_dir: Path
    secret: str
    """The cluster secret. PySyncObj unpickles what arrives on its port (defect D1), so every
    node encrypts and authenticates Raft traffic with it; a node never runs without one."""
    session_capacity: int = DEFAULT_SESSION_CAPACITY
    fsync: bool = True
    """Durable mode: fsync the journal before acknowledging entries (``kvstore.node.durable``).
    False (``--no-fsync``) is faster, and loses acknowledged writes if a majority loses power."""
    snapshot_count: int = DEFAULT_SNAPSHOT_COUNT
    """Log entries after which the node snapshots its state and compacts its log (as etcd's
    ``--snapshot-count``); PySyncObj also snapshots every five minutes."""
    background_snapshots: bool = True
    """Take and install snapshots off the Raft thread (``kvstore.node.snapshotter``); False is
    the on-thread control for benchmarks (``kv node run --snapshots-on-tick-thread``)."""
    dial_via: Mapping[str, str] = field(default_factory=dict)
    """Peer raft address -> host:port to connect to instead. For fault-injection tests only, which
    route each link through a proxy they can cut (``kvstore.check.proxy``); empty in real use.
    It may name members that join later."""
    join: bool = False
    """Join an existing cluster (etcd's ``--initial-cluster-state existing``): the node is not a
    member until one adds it (``kv member add``); ``peers`` are only the members to contact.
    Without it, ``me`` and ``peers`` are the initial members, used while the node's log and
    snapshot hold no member table."""
    tls: ServerTLS | None = None
    """The client API's certificate, key and client CA (``kvstore.tls``). Without it the API is
    plaintext and open to anyone who can connect, so it must then be on a loopback address."""
    metrics_address: str | None = None
    """Where to serve Prometheus metrics (``kvstore.metrics``; ``kv node run --metrics``), or
    ``None``: no metrics. The same rule as the API: plain HTTP on loopback only; with ``tls``,
    HTTPS that requires a client certificate from the same CA, on any address."""

    def __post_init__(self) -> None:
        if not self.secret:
            raise ConfigError("a cluster secret is required: PySyncObj unpickles what peers send")
        for member in (self.me, *self.peers):
            for address in (member.raft_address, member.api_address):
                split_address(address)
        for peer, via in self.dial_via.items():
            if peer == self.me.raft_address:
                raise ConfigError(f"dial-via names {peer!r}, this node's own raft address")
            split_address(peer)
            split_address(via)
        if self.tls is None and not is_loopback(self.me.api_address):
            raise ConfigError(
                f"refusing to serve the client API on {self.me.api_address} without TLS: anyone "
                "who can reach it could read and write (pass --cert, --key and --cacert)")
        if self.metrics_address is not None:
            split_address(self.metrics_address)
            if self.tls is None and not is_loopback(self.metrics_address):
                raise ConfigError(
                    f"refusing to serve metrics on {self.metrics_address} without TLS: anyone "
                    "who can reach it could read them (pass --cert, --key and --cacert, or "
                    "use a loopback address)")
        if self.cluster_id <= 0:
            raise ConfigError("the cluster id must be a positive integer")
        if self.snapshot_count < 1 or self.session_capacity < 1:
            raise ConfigError("the snapshot count and the session capacity must be positive")

    @property
    def members(self) -> tuple[Member, ...]:
        return (self.me, *self.peers)

    def api_address_of(self, raft_address: str) -> str:
        """The client API address of the node that Raft knows as ``raft_address`` ('' if unknown)."""
        for member in self.members:
            if member.raft_address == raft_address:
                return member.api_address
        return ""


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; raises ``ConfigError`` on anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    host, _ = split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False
