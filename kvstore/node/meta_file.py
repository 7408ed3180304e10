"""Raft's persistent term and vote (and the commit index) in a file that a crash at any instant
leaves whole: the old copy or the new one, never an empty one.

PySyncObj stores them in ``raft.journal.meta``, a pickle rewritten about once a second as a
temporary file renamed into place, with no fsync of either (D9): after a power loss the file is
0 bytes, the node forgets its vote, and so may vote twice in one term. Here every store is

    write raft.meta.tmp, fsync it, rename it over raft.meta, fsync the directory

so the rename only ever replaces a complete, durable file, and ``store`` returns only once the
new copy is on disk. Format: one line of JSON, then a line with its crc32 in hex; a file that
does not check out is treated as missing (``load`` says why).

The commit index is not Raft persistent state (a restarted node learns it from the leader);
PySyncObj keeps it to replay committed entries at start-up, and ``Journal`` never stores one
beyond the entries it knows to be durable.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("kvstore.node.meta_file")

FORMAT_VERSION = 1
VOTE_UNKNOWN = "unknown (the meta file was lost)"
"""The vote of a node that lost its meta file, for the term it recovered from its log: some
vote, so it grants none in that term (PySyncObj votes only when its vote is None)."""


@dataclass(frozen=True)
class Meta:
    term: int = 0
    voted_for: str | None = None
    commit_index: int = 1
    """PySyncObj's first index is 1: its log starts with a no-op at index 1."""

    def with_term(self, term: int, voted_for: Any) -> Meta:
        return replace(self, term=term, voted_for=None if voted_for is None else str(voted_for))

    def with_commit(self, commit_index: int) -> Meta:
        return replace(self, commit_index=commit_index)


class MetaFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(path) or "."
        self.stored: Meta | None = None
        """What the file holds now (None: nothing valid yet)."""

    def load(self) -> tuple[Meta | None, str]:
        """(the stored meta, "") or (None, why there is none)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, "missing"
        body, _, checksum = data.rstrip(b"\n").rpartition(b"\n")
        try:
            if int(checksum, 16) != zlib.crc32(body):
                return None, "fails its checksum" if data else "empty"
            doc = json.loads(body)
            if doc["version"] != FORMAT_VERSION:
                return None, f"format version {doc['version']}, expected {FORMAT_VERSION}"
            meta = Meta(term=int(doc["term"]), voted_for=doc["voted_for"],
                        commit_index=int(doc["commit_index"]))
        except (ValueError, KeyError, TypeError):
            return None, "empty" if not data else "not a meta file"
        self.stored = meta
        return meta, ""

    def load_or_default(self) -> Meta:
        meta, _ = self.load()
        return meta if meta is not None else Meta()

    def store(self, meta: Meta) -> None:
        """Replaces the file with ``meta``, durably; raises ``OSError`` if the disk fails."""
        body = json.dumps({"version": FORMAT_VERSION, "term": meta.term,
                           "voted_for": meta.voted_for, "commit_index": meta.commit_index},
                          sort_keys=True).encode()
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(body + b"\n" + f"{zlib.crc32(body):08x}\n".encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.stored = meta
