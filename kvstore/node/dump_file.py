"""The node's snapshot file: the state machine's snapshot bytes plus Raft's bookkeeping.

PySyncObj by default pickles the whole SyncObj in a forked child. We give it a serializer
instead, which (a) keeps pickles out of the file, (b) disables the fork (a forked child of a
process with gRPC threads can deadlock, and a late fork finishing after the log moved on is
how defect D7 emptied a journal), and (c) lets the file be checksummed and fsynced.

The same file is what a leader streams to a follower that fell behind, and what a follower
receives and loads.

Layout (version 2): MAGIC | snapshot | meta JSON | u32 meta length | u64 snapshot length |
sha256 of all before. The meta comes last because it holds the snapshot's digest, which is
known only once the snapshot has been written: the file is written in one pass, piece by piece,
by a background thread (``kvstore.node.snapshotter``), never held in memory whole. Version 1
files (MAGIC1 | u32 | meta | u64 | snapshot | sha256) are still read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from kvstore.state_machine import DIGEST_HEX_CHARS

MAGIC = b"KVSNAP2\n"
MAGIC_V1 = b"KVSNAP1\n"
FILE_NAME = "raft.dump"
"""The dump's name in a node's data directory."""
_DIGEST_BYTES = 32
_TRAILER = struct.Struct("<IQ")  # meta length, snapshot length
_HASH_BLOCK = 1 << 20


class DumpCorrupt(Exception):
    """A dump file that fails its checksum or is cut short."""


@dataclass(frozen=True)
class Dump:
    meta: dict[str, Any]
    snapshot: bytes


def state_digest(snapshot_sha256: Any) -> str:
    """The state digest (``StateMachine.digest``) from a sha256 fed with the snapshot bytes."""
    return str(snapshot_sha256.hexdigest()[:DIGEST_HEX_CHARS])


class Writer:
    """Writes a dump in one pass: ``write`` each piece of the snapshot, then ``finish``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")
        self._checksum = hashlib.sha256()
        self._snapshot = hashlib.sha256()
        self._snapshot_len = 0
        self._raw(MAGIC)

    def write(self, piece: bytes) -> None:
        self._snapshot.update(piece)
        self._snapshot_len += len(piece)
        self._raw(piece)

    def finish(self, meta: dict[str, Any]) -> str:
        """Adds the meta (with the snapshot's ``digest``), fsyncs and closes; returns the digest."""
        digest = state_digest(self._snapshot)
        meta_json = json.dumps({**meta, "digest": digest}, sort_keys=True).encode()
        self._raw(meta_json + _TRAILER.pack(len(meta_json), self._snapshot_len))
        self._file.write(self._checksum.digest())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return digest

    def abort(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _raw(self, data: bytes) -> None:
        self._checksum.update(data)
        self._file.write(data)


def encode(meta: dict[str, Any], snapshot: bytes) -> bytes:
    """A whole dump's bytes, with ``meta`` as given (``Writer`` adds the digest itself)."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    body = MAGIC + snapshot + meta_json + _TRAILER.pack(len(meta_json), len(snapshot))
    return body + hashlib.sha256(body).digest()


def write(path: str, meta: dict[str, Any], snapshot: bytes) -> None:
    """Writes and fsyncs a whole dump (``encode``) at once."""
    with open(path, "wb") as f:
        f.write(encode(meta, snapshot))
        f.flush()
        os.fsync(f.fileno())


def is_dump(data: bytes) -> bool:
    """Whether ``data`` starts like a dump of a version this build reads."""
    return data.startswith((MAGIC, MAGIC_V1))


def decode(data: bytes, path: str) -> Dump:
    """The dump in ``data`` (read from ``path``, named in errors), checksum verified."""
    if data.startswith(MAGIC_V1):
        return read_v1(data, path)
    return _read_v2(io.BytesIO(data), path)


def read_meta(f: BinaryIO, path: str = "dump") -> dict[str, Any]:
    """The meta alone, from the end of the open file ``f``: cheap, and checked only for shape
    (``read_open`` verifies the checksum)."""
    f.seek(0)
    magic = f.read(len(MAGIC))
    if magic == MAGIC_V1:
        f.seek(0)
        return read_v1(f.read(), path).meta
    if magic != MAGIC:
        raise DumpCorrupt(f"{path}: bad magic")
    size = f.seek(0, os.SEEK_END)
    if size < len(MAGIC) + _TRAILER.size + _DIGEST_BYTES:
        raise DumpCorrupt(f"{path}: truncated")
    f.seek(size - _DIGEST_BYTES - _TRAILER.size)
    meta_len, snapshot_len = _TRAILER.unpack(f.read(_TRAILER.size))
    if len(MAGIC) + snapshot_len + meta_len + _TRAILER.size + _DIGEST_BYTES != size:
        raise DumpCorrupt(f"{path}: lengths do not add up")
    f.seek(len(MAGIC) + snapshot_len)
    return _meta(f.read(meta_len), path)


def read_open(f: BinaryIO, path: str = "dump") -> Dump:
    """The whole dump in the open file ``f``, checksum verified, and the snapshot checked
    against its digest. The file is hashed in blocks and the snapshot read in one call, so no
    step copies the whole file while holding the interpreter (a restorer thread calls this)."""
    f.seek(0)
    if f.read(len(MAGIC)) == MAGIC_V1:
        f.seek(0)
        dump = read_v1(f.read(), path)
    else:
        dump = _read_v2(f, path)
    if state_digest(hashlib.sha256(dump.snapshot)) != dump.meta.get("digest"):
        raise DumpCorrupt(f"{path}: the snapshot does not match its digest")
    return dump


def read(path: str) -> Dump:
    """The dump at ``path`` (``read_open``)."""
    with open(path, "rb") as f:
        return read_open(f, path)


def _read_v2(f: BinaryIO, path: str) -> Dump:
    try:
        meta = read_meta(f, path)  # checks the magic and that the lengths add up
    except (struct.error, ValueError) as exc:
        raise DumpCorrupt(f"{path}: truncated or damaged") from exc
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    checksum = hashlib.sha256()
    remaining = size - _DIGEST_BYTES
    while remaining > 0:
        block = f.read(min(_HASH_BLOCK, remaining))
        if not block:
            raise DumpCorrupt(f"{path}: truncated")
        checksum.update(block)
        remaining -= len(block)
    if checksum.digest() != f.read(_DIGEST_BYTES):
        raise DumpCorrupt(f"{path}: bad checksum")
    f.seek(size - _DIGEST_BYTES - _TRAILER.size)
    _, snapshot_len = _TRAILER.unpack(f.read(_TRAILER.size))
    f.seek(len(MAGIC))
    return Dump(meta, f.read(snapshot_len))


def read_v1(data: bytes, path: str = "dump") -> Dump:
    """A version 1 file (written before the snapshot moved off the Raft thread)."""
    body, checksum = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if not body.startswith(MAGIC_V1) or hashlib.sha256(body).digest() != checksum:
        raise DumpCorrupt(f"{path}: bad magic or checksum")
    offset = len(MAGIC_V1)
    (meta_len,) = struct.unpack_from("<I", body, offset)
    offset += 4
    meta = _meta(body[offset:offset + meta_len], path)
    offset += meta_len
    (snapshot_len,) = struct.unpack_from("<Q", body, offset)
    offset += 8
    snapshot = body[offset:offset + snapshot_len]
    if len(snapshot) != snapshot_len:
        raise DumpCorrupt(f"{path}: truncated")
    return Dump(meta, snapshot)


def _meta(raw: bytes, path: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise DumpCorrupt(f"{path}: the meta is not JSON") from exc
    if not isinstance(meta, dict):
        raise DumpCorrupt(f"{path}: the meta is not an object")
    return meta


def fsync_directory(path: str) -> None:
    """Makes a rename inside ``path`` durable (PySyncObj renames the dump without it: D3)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
