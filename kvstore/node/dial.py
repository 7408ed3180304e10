"""Peers that are dialed at one address and known by another (for the fault-injection proxy).

PySyncObj names a peer by its address string: that string is the peer's ``id`` (equality,
hashing, ``getStatus`` keys) and, on every new connection, the dialing node sends its own
address (encrypted with the cluster secret) so that the accepting node can tell who called.
Which TCP port the dialer actually connects to is a separate question: the transport calls
``connect(node.ip, node.port)`` on the peer's node object (``TCPTransport._connectIfNecessarySingle``).

So a node whose peer objects keep the peer's real address as ``address``/``id`` but answer
``ip``/``port`` with a proxy's address sends its traffic for that peer through the proxy, while
Raft, on both ends, sees exactly the peers it would see without one. One proxy per directed
link makes each link a separate thing that a test can cut or slow down
(``kvstore.check.proxy``). The proxy cannot read or alter what it forwards.

Only the node whose address string is the larger of the two dials (``_shouldConnect``), so of
the two proxies of a pair only that node's is ever used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.node import TCPNode

from kvstore.config import split_address


class DialVia(TCPNode):
    """A peer known as ``address`` and reached by connecting to ``dial`` (``host:port``)."""

    def __init__(self, address: str, dial: str) -> None:
        super().__init__(address)
        self.__dial_host, self.__dial_port = split_address(dial)

    @property
    def ip(self) -> str | None:
        """What the transport connects to (``None`` if it does not resolve, as ``TCPNode.ip``)."""
        return globalDnsResolver().resolve(self.__dial_host)

    @property
    def port(self) -> int:
        return self.__dial_port

    def __repr__(self) -> str:
        return f"DialVia({self.address!r}, via={self.__dial_host}:{self.__dial_port})"


def node(address: str, dial_via: Mapping[str, str]) -> TCPNode:
    """The PySyncObj node object for the peer at ``address``: a ``DialVia`` if it is in
    ``dial_via`` (which may name members that join later)."""
    return DialVia(address, dial_via[address]) if address in dial_via else TCPNode(address)


def peer_nodes(peers: Iterable[str], dial_via: Mapping[str, str]) -> list[TCPNode]:
    """PySyncObj node objects for ``peers``: a ``DialVia`` for those in ``dial_via``."""
    addresses = list(peers)
    unknown = sorted(set(dial_via) - set(addresses))
    if unknown:
        raise ValueError(f"dial_via names addresses that are not peers: {unknown}")
    return [node(a, dial_via) for a in addresses]
