"""Raft messages between our nodes without PySyncObj's zlib on every small message.

PySyncObj's ``TcpConnection`` pickles each message, compresses it with zlib (level 3), then
seals it (``kvstore.node.wire_crypto``); the receiver undoes all three. Almost every Raft
message here is small: an acknowledgement is 64 bytes of pickle (68 compressed), an append of
one batch a few hundred. zlib saves nothing worth having on those, and it costs the one tick
thread of every node about 4-5 µs per message sent (mostly setting up its state) and 1 µs per
message received, for every message (measured: ``benchmarks/write_path_costs.py``).

The rule: a message under ``COMPRESS_FROM`` bytes of pickle goes uncompressed, *if the peer
reads uncompressed messages*; anything bigger (snapshot chunks, catch-up appends) is still
compressed, which pays on a real network. This is per connection of this node only: each of its
connections gets its own ``send``, parse and ``disconnect`` (instance attributes, which win over
the class's methods); other PySyncObj instances in the process, and the module, are untouched.

How a connection learns that its peer reads uncompressed messages, without a new message: a
pickle (protocol 2 and up) starts with the byte 0x80, a zlib stream with 0x78, so a receiver
tells them apart from the first byte. A lean connection compresses at zlib level 1, whose stream
header says "fastest" (FLEVEL 0, second byte 0x01); PySyncObj always compresses at level 3
(second byte 0x5E). So the first message from a lean peer (the key exchange, sent compressed)
already says it is lean, and from then on the connection sends small messages uncompressed.
A peer that never says so (an older node) only ever gets zlib, and every message it sends is
read as before. A disconnect forgets what the peer was: the next connection may reach a
different process.

Nothing of the authentication changes (D1): the counter and the tag are checked, and the bytes
opened, before anything is unpickled, exactly as PySyncObj does.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.tcp_connection import TcpConnection

from kvstore.node.internals import Internals

COMPRESS_FROM = 4096
"""Pickled messages at least this long are still compressed (snapshot chunks, catch-up)."""
LEAN_LEVEL = 1
"""Our zlib level: fast, and its header (FLEVEL 0) says "this sender reads uncompressed"."""
_PICKLE_START = 0x80
"""PROTO, the first opcode of every pickle of protocol 2 and up (PySyncObj pickles with 2+)."""
_ZLIB_LEAN_FLG = zlib.compress(b"", LEAN_LEVEL)[1]
_FRAME = struct.Struct("i")
"""PySyncObj's frame: a native-endian int32 length, then the (sealed) message."""


class LeanConnection:
    """The replaced methods of one ``TcpConnection``, and what it knows of its peer."""

    def __init__(self, conn: TcpConnection, counters: Counter[str]) -> None:
        self.conn = conn
        self.counters = counters
        self.peer_is_lean = False
        self._disconnect = conn.disconnect
        conn.send = self.send  # type: ignore[method-assign]
        conn._TcpConnection__processParseMessage = self.parse  # type: ignore[attr-defined]
        conn.disconnect = self.disconnect  # type: ignore[method-assign]

    def send(self, message: Any) -> None:
        conn = self.conn
        if conn.sendRandKey:
            message = (conn.sendRandKey, message)
        data = pysyncobj_pickle.dumps(message)
        if not self.peer_is_lean or len(data) >= COMPRESS_FROM:
            data = zlib.compress(data, LEAN_LEVEL)
        else:
            self.counters["wire_uncompressed_sent"] += 1
        if conn.encryptor:
            data = conn.encryptor.encrypt_at_time(data, int(monotonic_time()))
        conn._TcpConnection__writeBuffer += _FRAME.pack(len(data)) + data  # type: ignore[attr-defined]
        conn._TcpConnection__trySendBuffer()  # type: ignore[attr-defined]

    def parse(self) -> Any:
        """One whole message from the read buffer, or None (incomplete, or refused: the
        connection is then closed, as PySyncObj does)."""
        conn = self.conn
        buffer: bytes = conn._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if len(buffer) < _FRAME.size:
            return None
        (length,) = _FRAME.unpack_from(buffer)
        end = _FRAME.size + length
        if len(buffer) < end:
            return None
        data = buffer[_FRAME.size:end]
        try:
            if conn.encryptor:
                stamp = conn.encryptor.extract_timestamp(data)
                if stamp < conn.recvLastTimestamp:
                    raise ValueError("replayed or reordered message")
                conn.recvLastTimestamp = stamp
                data = conn.encryptor.decrypt(data)
            message = pysyncobj_pickle.loads(self._unpacked(data))
            if conn.recvRandKey:
                rand_key, message = message
                if rand_key != conn.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception:  # noqa: BLE001 - any bad message closes the connection, as PySyncObj's
            self.disconnect()
            return None
        conn._TcpConnection__readBuffer = buffer[end:]  # type: ignore[attr-defined]
        return message

    def _unpacked(self, data: bytes) -> bytes:
        if data[:1] == bytes((_PICKLE_START,)):
            self.peer_is_lean = True  # only a lean peer sends uncompressed messages
            return data
        if len(data) > 1 and data[1] == _ZLIB_LEAN_FLG:
            self.peer_is_lean = True
        return zlib.decompress(data)

    def disconnect(self) -> None:
        self.peer_is_lean = False
        self._disconnect()


NEEDED = ("_TcpConnection__processParseMessage", "_TcpConnection__trySendBuffer")
"""PySyncObj 0.3.17's private methods this module relies on (with the instance attributes
``_TcpConnection__readBuffer`` and ``__writeBuffer``), checked at start-up."""


def install(internals: Internals, counters: Counter[str]) -> None:
    """Makes every connection of this node lean: those it has, and each one made later."""
    missing = [name for name in NEEDED if not hasattr(TcpConnection, name)]
    if missing:
        raise RuntimeError(f"PySyncObj internals changed (0.3.17 needed): missing {missing}")
    internals.on_each_connection(lambda conn: LeanConnection(conn, counters))
