"""The member table: who is in the cluster, in which role, and the one-server changes to it.

Pure: no PySyncObj, no threads. ``kvstore.node.membership`` keeps the table in effect from the
log and makes PySyncObj follow it.

The rules a change obeys (Raft thesis 4.1 and 4.2.1, etcd's learner design):

* **One server at a time.** Each change adds a learner, promotes one learner, or removes one
  member, so the voters before and after differ by at most one server and any majority of the
  old voters overlaps any majority of the new ones. Every function below makes exactly one such
  change; nothing else builds a table from another.
* **A new member starts as a learner.** It receives the log and counts for nothing (not in
  elections, not in commits) until it is promoted, so adding an empty node never changes what
  the cluster needs to commit.
* **A removed member stays listed once, as REMOVED,** in the table of the change that removed
  it: the leader keeps sending it the log, so it receives the entry that removes it and stops
  serving. The next change drops it.
* **Every entry holds the whole table**, not a delta: the table in effect at an index is the one
  in the latest membership entry at or before it, and a node that joins late, or restores a
  snapshot, needs nothing older.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from kvstore.config import ConfigError, split_address
from kvstore.proto.log_pb2 import MemberPB, MemberRole, MembershipPB
from session.wire import WireDecodeError, parse_canonical

FORMAT_VERSION = 1

ENTRY_TYPE = 0x10
"""The first byte of a membership entry in PySyncObj's log. PySyncObj's own command types are
0-3 (regular, no-op, its membership, version); it appends entries of any other type as they
are and applies them as nothing, so these entries are ours alone."""


class ChangeRefused(ValueError):
    """A change that must not be made (the message says why)."""


class Role(enum.Enum):
    VOTER = "voter"
    LEARNER = "learner"
    REMOVED = "removed"


_TO_PB = {Role.VOTER: MemberRole.VOTER, Role.LEARNER: MemberRole.LEARNER,
          Role.REMOVED: MemberRole.REMOVED}
_FROM_PB = {pb: role for role, pb in _TO_PB.items()}


@dataclass(frozen=True)
class MemberInfo:
    name: str
    raft_address: str
    """The member's identity: PySyncObj names a node by its address."""
    api_address: str
    role: Role

    @property
    def label(self) -> str:
        return self.name or self.raft_address


@dataclass(frozen=True)
class Table:
    """The members after one change (or the initial ones), in ascending raft address."""

    members: tuple[MemberInfo, ...]
    change: str = "initial configuration"

    def __post_init__(self) -> None:
        addresses = [m.raft_address for m in self.members]
        if addresses != sorted(set(addresses)):
            raise ValueError("members must be unique and in ascending raft address")

    @staticmethod
    def of(members: Iterable[MemberInfo], change: str) -> Table:
        return Table(tuple(sorted(members, key=lambda m: m.raft_address)), change)

    def get(self, raft_address: str) -> MemberInfo | None:
        for member in self.members:
            if member.raft_address == raft_address:
                return member
        return None

    def role_of(self, raft_address: str) -> Role | None:
        member = self.get(raft_address)
        return member.role if member is not None else None

    def with_role(self, role: Role) -> set[str]:
        return {m.raft_address for m in self.members if m.role is role}

    @property
    def voters(self) -> set[str]:
        return self.with_role(Role.VOTER)

    @property
    def receivers(self) -> set[str]:
        """Sent the log without counting: learners, and the member this change removed."""
        return self.with_role(Role.LEARNER) | self.with_role(Role.REMOVED)

    def find(self, name_or_address: str) -> MemberInfo | None:
        """A member (not a removed one) by name or raft address."""
        for member in self.members:
            if member.role is not Role.REMOVED and name_or_address in (member.name,
                                                                      member.raft_address):
                return member
        return None

    # -- the three changes ----------------------------------------------------------------------

    def with_learner(self, name: str, raft_address: str, api_address: str) -> Table:
        """Adds a learner. A removed member's tombstone at that address is replaced."""
        for address in (raft_address, api_address):
            try:
                split_address(address)
            except ConfigError as exc:
                raise ChangeRefused(str(exc)) from exc
        if not name or any(c.isspace() for c in name):
            raise ChangeRefused(f"a member needs a name without spaces, not {name!r}")
        current = [m for m in self.members if m.role is not Role.REMOVED]
        for member in current:
            if member.name == name:
                raise ChangeRefused(f"there is already a member named {name}")
            if raft_address in (member.raft_address, member.api_address) or \
                    api_address in (member.raft_address, member.api_address):
                raise ChangeRefused(f"{member.label} already uses {raft_address} or {api_address}")
        new = MemberInfo(name, raft_address, api_address, Role.LEARNER)
        return Table.of([*current, new], f"add learner {name} ({raft_address})")

    def promoted(self, raft_address: str) -> Table:
        """Makes a learner a voter."""
        member = self.get(raft_address)
        if member is None or member.role is Role.REMOVED:
            raise ChangeRefused(f"{raft_address} is not a member")
        if member.role is Role.VOTER:
            raise ChangeRefused(f"{member.label} is already a voter")
        members = [replace(m, role=Role.VOTER) if m is member else m
                   for m in self.members if m.role is not Role.REMOVED]
        return Table.of(members, f"promote {member.label}")

    def without(self, raft_address: str) -> Table:
        """Removes a voter or a learner; it stays listed as REMOVED in this table only."""
        member = self.get(raft_address)
        if member is None or member.role is Role.REMOVED:
            raise ChangeRefused(f"{raft_address} is not a member")
        if member.role is Role.VOTER and self.voters == {raft_address}:
            raise ChangeRefused(f"{member.label} is the last voter: a cluster needs one")
        members = [replace(m, role=Role.REMOVED) if m is member else m
                   for m in self.members if m.role is not Role.REMOVED]
        return Table.of(members, f"remove {member.label}")

    # -- encodings ------------------------------------------------------------------------------

    def to_entry(self) -> bytes:
        """The payload of a membership log entry (without the type byte)."""
        pb = MembershipPB(format_version=FORMAT_VERSION, change=self.change, members=[
            MemberPB(name=m.name, raft_address=m.raft_address, api_address=m.api_address,
                     role=_TO_PB[m.role]) for m in self.members])
        return pb.SerializeToString(deterministic=True)

    @staticmethod
    def from_entry(data: bytes) -> Table:
        """Raises ``ValueError`` for bytes ``to_entry`` did not write."""
        try:
            pb = parse_canonical(MembershipPB, data)
        except WireDecodeError as exc:
            raise ValueError(f"not a membership entry: {exc}") from exc
        if pb.format_version != FORMAT_VERSION:
            raise ValueError(f"membership format version {pb.format_version}")
        if any(m.role not in _FROM_PB for m in pb.members):
            raise ValueError("a member without a role")
        return Table(tuple(MemberInfo(m.name, m.raft_address, m.api_address, _FROM_PB[m.role])
                           for m in pb.members), pb.change)

    def to_json(self) -> dict[str, Any]:
        """For the snapshot file's metadata (JSON)."""
        return {"change": self.change, "members": [
            {"name": m.name, "raft": m.raft_address, "api": m.api_address, "role": m.role.value}
            for m in self.members]}

    @staticmethod
    def from_json(doc: dict[str, Any]) -> Table:
        return Table(tuple(MemberInfo(str(m["name"]), str(m["raft"]), str(m["api"]),
                                      Role(m["role"])) for m in doc["members"]),
                     str(doc["change"]))


_TYPE_BYTE = bytes([ENTRY_TYPE])


def entry_bytes(table: Table) -> bytes:
    """The whole log entry: type byte and table."""
    return _TYPE_BYTE + table.to_entry()


def is_membership_entry(command: bytes) -> bool:
    """Checked on every append: one slice and compare."""
    return command[:1] == _TYPE_BYTE


def bootstrap(me: MemberInfo | None, peers: Iterable[MemberInfo]) -> Table:
    """The table a node starts from when neither its log nor its snapshot holds one: the
    members on its command line, all voters (etcd's --initial-cluster). A joining node
    (``me=None``) lists the members it contacts but is not among them."""
    members = {p.raft_address: replace(p, role=Role.VOTER) for p in peers}
    if me is not None:
        members[me.raft_address] = replace(me, role=Role.VOTER)
    return Table.of(members.values(),
                    "initial configuration" if me is not None else "joining: the members to contact")
