"""The node's snapshot file: the state machine's snapshot bytes plus Raft's bookkeeping.

PySyncObj by default pickles the whole SyncObj in a forked child. We give it a serializer
instead, which (a) keeps pickles out of the file, (b) disables the fork (a forked child of a
process with gRPC threads can deadlock, and a late fork finishing after the log moved on is
how defect D7 emptied a journal), and (c) lets the file be checksummed and fsynced.

PySyncObj calls the serializer on the tick thread, so ``snapshot()`` sees exactly the state at
the last applied entry. The same file is what a leader streams to a follower that fell behind.

Layout: MAGIC | u32 length | meta JSON | u64 length | state machine snapshot | sha256 of all before.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

MAGIC = b"KVSNAP1\n"
FILE_NAME = "raft.dump"
"""The dump's name in a node's data directory."""
_DIGEST_BYTES = 32


class DumpCorrupt(Exception):
    """A dump file that fails its checksum or is cut short."""


@dataclass(frozen=True)
class Dump:
    meta: dict[str, Any]
    snapshot: bytes


def encode(meta: dict[str, Any], snapshot: bytes) -> bytes:
    """The file's bytes."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    body = (MAGIC + struct.pack("<I", len(meta_json)) + meta_json
            + struct.pack("<Q", len(snapshot)) + snapshot)
    return body + hashlib.sha256(body).digest()


def write(path: str, meta: dict[str, Any], snapshot: bytes) -> None:
    """Writes and fsyncs the file (PySyncObj renames it into place afterwards)."""
    with open(path, "wb") as f:
        f.write(encode(meta, snapshot))
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> Dump:
    with open(path, "rb") as f:
        return decode(f.read(), path)


def read_meta(f: BinaryIO) -> dict[str, Any]:
    """The meta of an open dump file, without reading the snapshot (nor checking the checksum,
    which needs the whole file)."""
    head = f.read(len(MAGIC) + 4)
    if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
        raise DumpCorrupt(f"{getattr(f, 'name', 'dump')}: bad magic")
    (meta_len,) = struct.unpack_from("<I", head, len(MAGIC))
    meta: dict[str, Any] = json.loads(f.read(meta_len))
    return meta


def decode(data: bytes, path: str) -> Dump:
    """The dump in ``data`` (read from ``path``, named in errors)."""
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if not body.startswith(MAGIC) or hashlib.sha256(body).digest() != digest:
        raise DumpCorrupt(f"{path}: bad magic or checksum")
    offset = len(MAGIC)
    (meta_len,) = struct.unpack_from("<I", body, offset)
    offset += 4
    meta = json.loads(body[offset:offset + meta_len])
    offset += meta_len
    (snapshot_len,) = struct.unpack_from("<Q", body, offset)
    offset += 8
    snapshot = body[offset:offset + snapshot_len]
    if len(snapshot) != snapshot_len:
        raise DumpCorrupt(f"{path}: truncated")
    return Dump(meta, snapshot)


def fsync_directory(path: str) -> None:
    """Makes a rename inside ``path`` durable (PySyncObj renames the dump without it: D3)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
