"""``kvstore.node.lean_wire``: small Raft messages uncompressed between lean peers, zlib with
any other, and authentication before unpickling as before.

Two real PySyncObj ``TcpConnection`` objects over a socket pair, each sealing with its own
``WireCrypto`` (as two node processes would), driven by a real poller in this thread.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
import pytest
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from kvstore.node import lean_wire
from kvstore.node.lean_wire import COMPRESS_FROM, LeanConnection
from kvstore.node.wire_crypto import WireCrypto

SECRET = "lean-wire-test"
ACK = {"type": "next_node_idx", "next_node_idx": 12, "reset": False, "success": True}


class End:
    """One side: a connection, what it received, and what it put on the wire."""

    def __init__(self, sock: socket.socket, crypto: WireCrypto, lean: bool) -> None:
        self.poller = createPoller("poll")
        self.received: list[Any] = []
        self.counters: Counter[str] = Counter()
        self.conn = TcpConnection(self.poller, socket=sock, onMessageReceived=self.received.append)
        self.conn.encryptor = crypto
        self.lean = LeanConnection(self.conn, self.counters) if lean else None
        self.crypto = crypto

    def poll(self) -> None:
        self.poller.poll(0.05)


@contextmanager
def pair(a_lean: bool, b_lean: bool) -> Iterator[tuple[End, End]]:
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.setblocking(False)
    a = End(left, WireCrypto(SECRET), a_lean)
    b = End(right, WireCrypto(SECRET), b_lean)
    try:
        yield a, b
    finally:
        a.conn.disconnect()
        b.conn.disconnect()


def deliver(sender: End, receiver: End, message: Any) -> Any:
    """Sends ``message`` and polls the receiver until it has it; returns what arrived."""
    before = len(receiver.received)
    sender.conn.send(message)
    for _ in range(40):
        receiver.poll()
        if len(receiver.received) > before:
            return receiver.received[-1]
    raise AssertionError(f"not delivered: {message!r}")


def plaintext_on_wire(sender: End, receiver: End, message: Any) -> bytes:
    """What ``message`` looks like inside its seal, read off the receiver's socket (its
    connection does not see it)."""
    sender.conn.send(message)  # written at once: the socket pair has room
    sock = receiver.conn._TcpConnection__socket  # type: ignore[attr-defined]
    frame = sock.recv(1 << 20)
    (length,) = struct.unpack_from("i", frame)
    assert len(frame) == 4 + length
    return receiver.crypto.decrypt(frame[4:])


def test_between_lean_peers_small_messages_go_uncompressed() -> None:
    with pair(True, True) as (a, b):
        assert deliver(a, b, "hello") == "hello"  # the first says "lean" in its zlib header
        assert b.lean is not None and b.lean.peer_is_lean
        assert deliver(b, a, ACK) == ACK  # b knows: uncompressed
        assert b.counters["wire_uncompressed_sent"] == 1
        assert a.lean is not None and a.lean.peer_is_lean
        for n in range(20):
            assert deliver(a, b, {**ACK, "next_node_idx": n}) == {**ACK, "next_node_idx": n}
        assert a.counters["wire_uncompressed_sent"] == 20


def test_the_uncompressed_message_is_a_sealed_pickle() -> None:
    with pair(True, True) as (a, b):
        assert a.lean is not None
        first = plaintext_on_wire(a, b, ACK)
        assert first[:2] == zlib.compress(b"", 1)[:2]  # zlib, level 1: "I read uncompressed"
        a.lean.peer_is_lean = True  # as if b had said so
        raw = plaintext_on_wire(a, b, ACK)
        assert raw[0] == 0x80 and pysyncobj_pickle.loads(raw) == ACK
        big = {"type": "append_entries", "entries": [(b"v" * COMPRESS_FROM, 1, 1)]}
        compressed = plaintext_on_wire(a, b, big)
        assert compressed[0] == 0x78 and pysyncobj_pickle.loads(zlib.decompress(compressed)) == big


def test_big_messages_stay_compressed_between_lean_peers() -> None:
    with pair(True, True) as (a, b):
        deliver(a, b, "hello")
        deliver(b, a, "hello")
        chunk = {"type": "append_entries", "entries": [(b"v" * COMPRESS_FROM, 1, 1)]}
        assert deliver(a, b, chunk) == chunk
        assert a.counters["wire_uncompressed_sent"] == 0


@pytest.mark.parametrize("lean_side", ["a", "b"])
def test_a_plain_pysyncobj_peer_only_ever_gets_zlib(lean_side: str) -> None:
    with pair(lean_side == "a", lean_side == "b") as (a, b):
        lean = a if lean_side == "a" else b
        for n in range(10):
            assert deliver(a, b, {**ACK, "next_node_idx": n})["next_node_idx"] == n
            assert deliver(b, a, {**ACK, "next_node_idx": -n})["next_node_idx"] == -n
        assert lean.lean is not None and not lean.lean.peer_is_lean
        assert lean.counters["wire_uncompressed_sent"] == 0


def test_a_disconnect_forgets_that_the_peer_was_lean() -> None:
    with pair(True, True) as (a, b):
        deliver(a, b, "hello")
        assert b.lean is not None and b.lean.peer_is_lean
        b.conn.disconnect()
        assert not b.lean.peer_is_lean
        assert b.conn.state == CONNECTION_STATE.DISCONNECTED


def test_a_message_not_sealed_with_the_secret_is_refused_unread() -> None:
    with pair(True, True) as (a, b):
        deliver(a, b, "hello")
        bogus = pysyncobj_pickle.dumps("unsealed")  # a pickle, no seal: never unpickled
        sock = a.conn._TcpConnection__socket  # type: ignore[attr-defined]
        sock.send(struct.pack("i", len(bogus)) + bogus)
        for _ in range(20):
            b.poll()
        assert b.received == ["hello"]
        assert b.conn.state == CONNECTION_STATE.DISCONNECTED


def test_a_replayed_message_is_refused() -> None:
    with pair(True, True) as (a, b):
        sealed = a.crypto.encrypt_at_time(zlib.compress(pysyncobj_pickle.dumps("x"), 1), 0)
        later = a.crypto.encrypt_at_time(zlib.compress(pysyncobj_pickle.dumps("y"), 1), 0)
        sock = a.conn._TcpConnection__socket  # type: ignore[attr-defined]
        sock.send(struct.pack("i", len(later)) + later + struct.pack("i", len(sealed)) + sealed)
        for _ in range(20):
            b.poll()
        assert b.received == ["y"]  # the older counter after it closes the connection
        assert b.conn.state == CONNECTION_STATE.DISCONNECTED


def test_install_refuses_a_pysyncobj_without_the_methods_it_replaces(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(TcpConnection, "_TcpConnection__processParseMessage")
    with pytest.raises(RuntimeError, match="0.3.17"):
        lean_wire.install(None, Counter())  # type: ignore[arg-type]
