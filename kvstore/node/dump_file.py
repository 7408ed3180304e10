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
from typing import Any

MAGIC = b"KVSNAP1\n"
_DIGEST_BYTES = 32


class DumpCorrupt(Exception):
    """A dump file that fails its checksum or is cut short."""


@dataclass(frozen=True)
class Dump:
    meta: dict[str, Any]
    snapshot: bytes


def write(path: str, meta: dict[str, Any], snapshot: bytes) -> None:
    """Writes and fsyncs the file (PySyncObj renames it into place afterwards)."""
    meta_json = json.dumps(meta, sort_keys=True).encode()
    body = (MAGIC + struct.pack("<I", len(meta_json)) + meta_json
            + struct.pack("<Q", len(snapshot)) + snapshot)
    with open(path, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> Dump:
    with open(path, "rb") as f:
        data = f.read()
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
