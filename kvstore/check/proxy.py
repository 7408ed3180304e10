"""Network faults without root: a TCP proxy on every directed link between Raft nodes.

A partition needs a place where a link can be cut, and on one machine without root (no
iptables, no network namespaces) that place is a proxy. PySyncObj knows a peer by the address
string the dialing node sends over the (encrypted) connection, not by the port it dialed, so a
node can be told to dial each peer through a proxy while keeping the peer's real address as its
identity (``kvstore.node.dial``, ``NodeConfig.dial_via``, ``kv node run --dial-via``). With one
proxy per directed link, a partition is just a set of cut proxies.

``LinkProxy`` forwards every connection made to its port to one target and can

* ``cut()``: close the connections it carries, and close every new one as soon as it is accepted
  (to the dialer, the peer hangs up at once; PySyncObj redials every ``connectionRetryTime``,
  5 s by default, so a healed link comes back within that);
* ``heal()``: forward again;
* ``set_delay(s)``: forward each chunk ``s`` seconds after it arrived, in both directions and in
  order (a request-reply over one link then takes at least ``2 * s``).

``Network`` keeps one ``LinkProxy`` per ordered pair of nodes. PySyncObj opens one connection
per pair, dialed by the node whose address string is larger, so only one proxy of each pair
carries traffic; both exist so that nothing depends on that rule.

Everything is on 127.0.0.1 and bounded: each proxy is one daemon thread with a ``selectors``
loop, each direction of a connection buffers at most ``MAX_PENDING`` bytes (then the proxy stops
reading and TCP pushes back), and ``stop()``/``close()`` end the threads and close every socket.
The proxy cannot read what it forwards: Raft traffic is encrypted with the cluster secret.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar, cast

from kvstore.config import is_loopback, split_address

T = TypeVar("T")

HOST = "127.0.0.1"
CHUNK = 64 * 1024
"""Largest read from a socket."""
MAX_PENDING = 4 * 1024 * 1024
"""Bytes one direction of a connection may hold (waiting for their delay or a slow reader)."""
CONNECT_TIMEOUT = 2.0
"""Connecting to the target; on loopback it succeeds or is refused at once."""
CONTROL_TIMEOUT = 5.0
"""Longest a control call waits for the proxy's thread to carry it out."""


@dataclass(frozen=True)
class LinkStats:
    """What a proxy has done since it started."""

    bytes_to_target: int
    bytes_from_target: int
    connections: int
    """Connections accepted and forwarded to the target."""
    refused: int
    """Connections accepted while cut, and closed at once."""
    unreachable: int
    """Connections closed because the target refused them (its node is down)."""
    open: int
    """Connections being forwarded now."""

    @property
    def bytes_forwarded(self) -> int:
        return self.bytes_to_target + self.bytes_from_target


class _Flow:
    """One direction of a proxied connection: chunks read from ``src`` wait here, each with the
    time it may be sent at, until they are written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.pending = 0
        self.eof = False
        """``src`` has closed its side; once the chunks are out, ``dst`` is shut for writing."""
        self.shut = False
        self.blocked = False
        """``dst`` did not take everything: wait until it is writable."""
        self.sent = 0

    def wants_read(self) -> bool:
        return not self.eof and self.pending < MAX_PENDING

    def next_due(self) -> float | None:
        return self.chunks[0][0] if self.chunks and not self.blocked else None


class _Connection:
    """One proxied connection: the dialer's socket (``client``) and ours to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.to_target = _Flow(client, upstream)
        self.from_target = _Flow(upstream, client)
        self.flows = (self.to_target, self.from_target)
        self.sockets = (client, upstream)

    def reading_from(self, sock: socket.socket) -> _Flow:
        return self.to_target if sock is self.to_target.src else self.from_target

    def writing_to(self, sock: socket.socket) -> _Flow:
        return self.to_target if sock is self.to_target.dst else self.from_target


class LinkProxy:
    """Forwards connections made to ``127.0.0.1:listen_port`` (0: any free port) to ``target``.

    The controls (``cut``, ``heal``, ``set_delay``, ``stats``) may be called from any thread;
    they run on the proxy's own thread and have taken effect when they return.
    """

    def __init__(self, target: str, listen_port: int = 0) -> None:
        if not is_loopback(target):
            raise ValueError(f"the link proxy forwards to loopback addresses only, not {target!r}")
        self.target = split_address(target)
        self._listener = socket.create_server((HOST, listen_port), backlog=64)
        self._listener.setblocking(False)
        self.address = f"{HOST}:{self._listener.getsockname()[1]}"
        """``127.0.0.1:port``: where to dial to reach ``target`` through this proxy."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._interest: dict[socket.socket, int] = {}
        self._connections: dict[socket.socket, _Connection] = {}
        self._cut = False
        self._delay = 0.0
        self._accepted = self._refused = self._unreachable = 0
        self._sent_by_closed = (0, 0)
        self._lock = threading.Lock()
        self._actions: list[Callable[[], None]] = []
        self._running = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> LinkProxy:
        with self._lock:
            if self._thread is not None or self._stopping:
                raise RuntimeError("a link proxy starts once")
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=f"link-proxy-{self.address}")
            self._running = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Closes every connection and the listening port, and ends the thread. Idempotent."""
        with self._lock:
            self._stopping = True
            running = self._running
        if running and self._thread is not None:
            self._wake()
            self._thread.join(CONTROL_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError(f"link proxy {self.address} did not stop")
        else:
            self._close_all()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- controls -----------------------------------------------------------------------------

    def cut(self) -> None:
        """Drops the connections carried now; new ones are accepted and closed at once."""
        def action() -> None:
            self._cut = True
            for connection in set(self._connections.values()):
                self._close(connection)
        self._on_loop(action)

    def heal(self) -> None:
        """Forwards new connections again (the dialer reconnects by itself)."""
        def action() -> None:
            self._cut = False
        self._on_loop(action)

    def set_delay(self, seconds: float) -> None:
        """Forwards each chunk that arrives from now on ``seconds`` after it arrived."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")

        def action() -> None:
            self._delay = seconds
        self._on_loop(action)

    def stats(self) -> LinkStats:
        return self._on_loop(self._stats)

    # -- the proxy's thread -------------------------------------------------------------------

    def _on_loop(self, action: Callable[[], T]) -> T:
        """Runs ``action`` on the proxy's thread, so that only that thread touches its state."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(action())
            except Exception as exc:
                future.set_exception(exc)

        with self._lock:
            queued = self._running  # else not started or stopped: no other thread touches the state
            if queued:
                self._actions.append(run)
        if queued:
            self._wake()
        else:
            run()
        return future.result(CONTROL_TIMEOUT)

    def _loop(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._run_actions():
                now = time.monotonic()
                for connection in set(self._connections.values()):
                    self._forward_due(connection, now)
                self._update_interest()
                for key, mask in self._selector.select(self._timeout(time.monotonic())):
                    sock = cast(socket.socket, key.fileobj)
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        self._drain_wake()
                    else:
                        self._on_ready(sock, mask)
        finally:
            with self._lock:
                self._running = False
                leftovers, self._actions = self._actions, []
            for run in leftovers:
                run()
            self._close_all()

    def _run_actions(self) -> bool:
        """Carries out queued controls; True when the proxy is stopping."""
        with self._lock:
            actions, self._actions = self._actions, []
            stopping = self._stopping
        for run in actions:
            run()
        return stopping

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._cut:
            self._refused += 1
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        except OSError:
            self._unreachable += 1
            client.close()
            return
        self._accepted += 1
        connection = _Connection(client, upstream)
        for sock in connection.sockets:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Raft messages are small
            self._connections[sock] = connection

    def _on_ready(self, sock: socket.socket, mask: int) -> None:
        connection = self._connections.get(sock)
        if connection is None:
            return  # closed earlier in this round
        if mask & selectors.EVENT_WRITE:
            connection.writing_to(sock).blocked = False
        if mask & selectors.EVENT_READ:
            flow = connection.reading_from(sock)
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                self._close(connection)  # reset: the other side gets closed too
                return
            if data:
                flow.chunks.append((time.monotonic() + self._delay, data))
                flow.pending += len(data)
            else:
                flow.eof = True

    def _forward_due(self, connection: _Connection, now: float) -> None:
        """Writes the chunks whose time has come, and passes on a closed side once drained."""
        for flow in connection.flows:
            while flow.chunks and not flow.blocked and flow.chunks[0][0] <= now:
                due, data = flow.chunks[0]
                try:
                    sent = flow.dst.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(connection)
                    return
                flow.sent += sent
                flow.pending -= sent
                if sent < len(data):
                    flow.chunks[0] = (due, data[sent:])
                    flow.blocked = True
                else:
                    flow.chunks.popleft()
            if flow.eof and not flow.chunks and not flow.shut:
                flow.shut = True
                try:
                    flow.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    self._close(connection)
                    return
        if all(flow.shut for flow in connection.flows):
            self._close(connection)

    def _update_interest(self) -> None:
        for sock, connection in self._connections.items():
            mask = ((selectors.EVENT_READ if connection.reading_from(sock).wants_read() else 0)
                    | (selectors.EVENT_WRITE if connection.writing_to(sock).blocked else 0))
            if mask == self._interest.get(sock, 0):
                continue
            if not mask:
                self._selector.unregister(sock)
                del self._interest[sock]
            elif sock in self._interest:
                self._selector.modify(sock, mask)
                self._interest[sock] = mask
            else:
                self._selector.register(sock, mask)
                self._interest[sock] = mask

    def _timeout(self, now: float) -> float | None:
        """How long select() may sleep: until the next chunk is due (None: until an event)."""
        dues = [due for connection in set(self._connections.values())
                for due in (flow.next_due() for flow in connection.flows) if due is not None]
        return max(0.0, min(dues) - now) if dues else None

    def _close(self, connection: _Connection) -> None:
        if connection.sockets[0] not in self._connections:
            return
        to_target, from_target = self._sent_by_closed
        self._sent_by_closed = (to_target + connection.to_target.sent,
                                from_target + connection.from_target.sent)
        for sock in connection.sockets:
            del self._connections[sock]
            if self._interest.pop(sock, None) is not None:
                self._selector.unregister(sock)
            sock.close()

    def _close_all(self) -> None:
        for connection in set(self._connections.values()):
            self._close(connection)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def _stats(self) -> LinkStats:
        open_connections = set(self._connections.values())
        to_target, from_target = self._sent_by_closed
        return LinkStats(
            bytes_to_target=to_target + sum(c.to_target.sent for c in open_connections),
            bytes_from_target=from_target + sum(c.from_target.sent for c in open_connections),
            connections=self._accepted,
            refused=self._refused,
            unreachable=self._unreachable,
            open=len(open_connections),
        )

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except OSError:
            pass  # the socket is full (a wake-up is pending), or the proxy has stopped

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass


Link = tuple[str, str]
"""``(dialer, target)``: the raft addresses of the node that dials and of the one it dials."""


class Network:
    """One ``LinkProxy`` per ordered pair of the nodes ``raft_addresses``, all started.

    Build each node's config with ``dial_via(node)``; then ``partition``, ``isolate``, ``delay``
    and ``heal`` change what gets through. ``close()`` (or the ``with`` block) stops it all.
    ``add_node`` and ``remove_node`` follow membership changes; call them from one thread (or
    between faults): the other methods do not lock against them.
    """

    def __init__(self, raft_addresses: Iterable[str]) -> None:
        self.nodes = tuple(raft_addresses)
        if len(self.nodes) < 2 or len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"a network needs two or more distinct nodes, not {self.nodes}")
        self._links: dict[Link, LinkProxy] = {}
        try:
            for dialer in self.nodes:
                for target in self.nodes:
                    if dialer != target:
                        self._links[(dialer, target)] = LinkProxy(target).start()
        except BaseException:
            self.close()
            raise

    def add_node(self, node: str) -> None:
        """Adds ``node`` (a member that joins while the network runs): a proxy on every link
        between it and each node already here, both ways, healed.

        The nodes already running were started with their ``dial_via`` and do not know the new
        proxies: a link they dial to the new node would bypass the network. So the new node's
        address string must be the largest of all (``kvstore.node.dial``: only the larger
        address dials), and it is refused otherwise."""
        if node in self.nodes or any(node <= other for other in self.nodes):
            raise ValueError(f"{node!r} must sort after every node of this network "
                             f"({', '.join(self.nodes)}): only it dials its links")
        added: dict[Link, LinkProxy] = {}
        try:
            for other in self.nodes:
                added[(node, other)] = LinkProxy(other).start()
                added[(other, node)] = LinkProxy(node).start()
        except BaseException:
            for proxy in added.values():
                proxy.stop()
            raise
        self._links.update(added)
        self.nodes = (*self.nodes, node)

    def remove_node(self, node: str) -> None:
        """Stops the proxies of every link of ``node`` (a member removed and stopped)."""
        if node not in self.nodes:
            raise ValueError(f"{node!r} is not a node of this network")
        self.nodes = tuple(n for n in self.nodes if n != node)
        for link in [link for link in self._links if node in link]:
            self._links.pop(link).stop()

    def link(self, dialer: str, target: str) -> LinkProxy:
        return self._links[(dialer, target)]

    def dial_via(self, node: str) -> dict[str, str]:
        """``node``'s ``NodeConfig.dial_via``: each peer's raft address -> its proxy's address."""
        if node not in self.nodes:
            raise ValueError(f"{node!r} is not a node of this network")
        return {target: proxy.address for (dialer, target), proxy in self._links.items()
                if dialer == node}

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Sets who reaches whom: nodes reach each other only inside their group.

        Every node must be in exactly one group. Links between groups are cut in both
        directions; links inside a group are healed (so this replaces any earlier partition).
        Delays are left as they are.
        """
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for node in group:
                if node not in self.nodes or node in group_of:
                    raise ValueError(f"{node!r} is not a node of this network, or is in two groups")
                group_of[node] = index
        if len(group_of) != len(self.nodes):
            missing = sorted(set(self.nodes) - set(group_of))
            raise ValueError(f"every node must be in a group; missing: {missing}")
        for (dialer, target), proxy in self._links.items():
            if group_of[dialer] == group_of[target]:
                proxy.heal()
            else:
                proxy.cut()

    def isolate(self, node: str) -> None:
        """Cuts ``node`` off from every other node; the others still reach each other."""
        self.partition([{node}, set(self.nodes) - {node}])

    def delay(self, seconds: float, links: Iterable[Link] | None = None) -> None:
        """Delays every chunk on ``links`` (default: all) by ``seconds``, both ways."""
        for link in (self._links if links is None else links):
            self._links[link].set_delay(seconds)

    def heal(self) -> None:
        """Ends every fault: all links forward again, without delay."""
        for proxy in self._links.values():
            proxy.heal()
            proxy.set_delay(0.0)

    def stats(self) -> dict[Link, LinkStats]:
        return {link: proxy.stats() for link, proxy in self._links.items()}

    def bytes_forwarded(self) -> int:
        """Bytes forwarded on all links, both directions, since the network started."""
        return sum(stats.bytes_forwarded for stats in self.stats().values())

    def close(self) -> None:
        """Stops every proxy (closing every connection through them). Idempotent."""
        for proxy in self._links.values():
            proxy.stop()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
