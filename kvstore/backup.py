"""Backups: the leader's snapshot file, saved whole, checked, and restored into a new cluster.

A backup is exactly the file a node keeps as its snapshot (``kvstore.node.dump_file``): the
state machine's snapshot (data and sessions in LRU order, with their cached results), the index
and term of the last entry it covers, the membership, and the state digest, sealed by a SHA-256
of the whole. ``kv snapshot save`` streams it from the leader; this module is the one place
outside the node that knows what its fields mean:

* ``parse`` checks a file before anything trusts it: the checksum (a damaged or cut file), the
  header, the snapshot's own validation, and that the state it holds has the recorded digest;
* ``for_new_cluster`` turns it into the snapshot file every node of a *new* cluster starts from.

What a restore changes, and why:

* the membership: the new nodes' Raft addresses (``rewrite_membership``);
* the terms of the two log entries the file records become 0, their indexes stay. A new node has
  no journal, so PySyncObj starts it at term 0 and its first leader is elected at term 1. Had the
  entries kept the old cluster's term (say 7), entries appended at term 1 would follow entries
  of term 7, and Raft's up-to-date rule (compare the last entries' terms first) would rank a node
  holding only the restored entries above one holding newer committed ones: it could be elected
  without them. With term 0, terms grow along the log again.

The cluster id stays: it is inside the snapshot, and the sessions it holds belong to it, so a
client that retries a request after the restore is answered from the restored cache.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from kvstore import snapshot
from kvstore.node import dump_file
from kvstore.state_machine import StateMachine


class BackupError(Exception):
    """A file that is not a backup this version can restore, said in one line."""


@dataclass(frozen=True)
class Backup:
    meta: dict[str, Any]
    """The node's bookkeeping: ``last``/``prev`` entries ``[command hex, index, term]``,
    ``cluster`` (the members' Raft addresses), ``digest``."""
    snapshot: bytes
    """The state machine's snapshot (``kvstore.snapshot``)."""
    state: snapshot.State
    size: int
    """Bytes in the file."""

    @property
    def cluster_id(self) -> int:
        return self.state.cluster_id

    @property
    def index(self) -> int:
        """The last log index the state includes."""
        return int(self.meta["last"][1])

    @property
    def term(self) -> int:
        return int(self.meta["last"][2])

    @property
    def digest(self) -> str:
        return str(self.meta["digest"])

    @property
    def members(self) -> list[str]:
        return [str(address) for address in self.meta["cluster"]]

    @property
    def session_capacity(self) -> int:
        return self.state.sessions.capacity

    def describe(self) -> dict[str, object]:
        """What ``kv snapshot status`` shows."""
        return {"cluster_id": self.cluster_id, "index": self.index, "term": self.term,
                "digest": self.digest, "keys": len(self.state.data),
                "sessions": len(self.state.sessions), "session_capacity": self.session_capacity,
                "members": len(self.members), "bytes": self.size}


def parse(data: bytes, source: str) -> Backup:
    """The backup in ``data`` (read from ``source``, named in errors); ``BackupError`` if it is
    damaged, not a backup, or holds a state that does not match its digest."""
    if not dump_file.is_dump(data):
        raise BackupError(f"{source} is not a kv snapshot file (kv snapshot save writes them)")
    try:
        dump = dump_file.decode(data, source)
    except (dump_file.DumpCorrupt, struct.error, ValueError):
        raise BackupError(f"{source} is damaged: its checksum does not match its content (the "
                          "file was cut short or altered)") from None
    _check_meta(dump.meta, source)
    try:
        state = snapshot.decode(dump.snapshot)
        replica = StateMachine(state.cluster_id, state.sessions.capacity)
        replica.restore(dump.snapshot)
    except snapshot.SnapshotError as exc:
        raise BackupError(f"{source}: the snapshot inside is not valid: {exc}") from None
    if replica.digest() != dump.meta["digest"]:
        raise BackupError(f"{source}: the state inside does not match its recorded digest "
                          f"({replica.digest()}, not {dump.meta['digest']})")
    return Backup(dump.meta, dump.snapshot, state, len(data))


def rewrite_membership(meta: dict[str, Any], raft_addresses: list[str]) -> dict[str, Any]:
    """``meta`` naming ``raft_addresses`` as the members: the one place that knows where a
    snapshot records the membership.

    PySyncObj keeps it in the dump as ``cluster``, every member's Raft address. Our nodes read
    the member table (``membership``: names, addresses, roles, ``kvstore.node.membership``)
    and would follow the old cluster's: it is dropped, so the new nodes start from the members
    on their command line, as any new cluster does.
    """
    kept = {key: value for key, value in meta.items() if key != "membership"}
    return {**kept, "cluster": sorted(raft_addresses)}


def for_new_cluster(backup: Backup, raft_addresses: list[str]) -> bytes:
    """The snapshot file every node of a new cluster of ``raft_addresses`` starts from."""
    meta = rewrite_membership(backup.meta, raft_addresses)
    for entry in ("last", "prev"):
        command, index, _term = meta[entry]
        meta[entry] = [command, index, 0]  # see the module docstring: terms restart
    return dump_file.encode(meta, backup.snapshot)


def _check_meta(meta: Any, source: str) -> None:
    try:
        ok = (isinstance(meta, dict) and isinstance(meta["digest"], str)
              and isinstance(meta["cluster"], list)
              and all(_is_entry(meta[entry]) for entry in ("last", "prev")))
    except KeyError:
        ok = False
    if not ok:
        raise BackupError(f"{source}: its header is not one this version reads")


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for n in entry[1:]))
