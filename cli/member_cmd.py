"""``kv member list|add|promote|remove``: membership changes, etcdctl style.

A new member is always added as a **learner**: it receives the log and counts for nothing until
``kv member promote`` makes it a voter, which the leader refuses until the learner is caught up.
Adding an empty node directly as a voter (etcdctl's default) makes it part of every majority
before it holds anything: a three-node cluster that has lost one member would stop committing
until the newcomer caught up (Raft thesis 4.2.1). So there is no way to skip the learner stage.

These commands work on any cluster (``--endpoints``); for a local cluster directory,
``kv cluster add-node`` and ``kv cluster remove-node`` also start or stop the node and update
``cluster.json``. The functions here are the programmatic API too (``resolve``, ``wait_in_sync``,
``promote_when_in_sync``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from cli.exits import INVALID_INPUT, CliError
from cli.output import Report, emit
from cli.settings import Settings, global_options
from kvstore import errors

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.proto.api_pb2 import MemberListResponse, MemberStatus

POLL = 0.2
"""Seconds between two looks at a learner that is catching up."""
DEFAULT_SYNC_TIMEOUT = 60.0


@click.group()
def member() -> None:
    """List the members, add a learner, promote it, remove a member."""


@member.command("list")
@global_options
def list_() -> None:
    """One row per member: name, role, addresses, match index, connected, in sync.

    \b
    Asks the leader, which alone knows every member's match index and connection. With no
    leader, shows the view of the first node that answers (and says so).
    """
    settings = Settings.current()
    with settings.client() as client:
        listing, note = members_or_local_view(client)
    emit(report(listing, note), settings.write_out)


@member.command()
@click.argument("name")
@click.option("--raft", "raft_address", required=True, metavar="HOST:PORT",
              help="The new member's Raft address.")
@click.option("--api", "api_address", required=True, metavar="HOST:PORT",
              help="The new member's client API address.")
@global_options
def add(name: str, raft_address: str, api_address: str) -> None:
    """Adds NAME as a learner (start its node with 'kv node run --join' first).

    A learner receives the log and counts for nothing; promote it with 'kv member promote'
    once it has caught up.
    """
    settings = Settings.current()
    with settings.client() as client:
        listing = change(lambda: client.member_add(name, raft_address, api_address))
    emit(report(listing, f"added learner {name}; once it has caught up: kv member promote "
                f"{name}"), settings.write_out)


@member.command()
@click.argument("member_name", metavar="NAME")
@click.option("--wait", "wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Wait up to this long for the learner to catch up [default: do not wait].")
@global_options
def promote(member_name: str, wait: float) -> None:
    """Makes the learner NAME a voter; refused unless it has caught up with the leader."""
    settings = Settings.current()
    with settings.client() as client:
        target = resolve(client, member_name)
        if wait:
            listing = promote_when_in_sync(client, target.raft_address, wait)
        else:
            listing = change(lambda: client.member_promote(target.raft_address))
    emit(report(listing, f"promoted {target.name or target.raft_address} to voter"),
         settings.write_out)


@member.command()
@click.argument("member_name", metavar="NAME")
@global_options
def remove(member_name: str) -> None:
    """Removes NAME (a voter or a learner; the leader hands over first).

    The removed node stops serving and reports itself removed; stop its process afterwards.
    """
    settings = Settings.current()
    with settings.client() as client:
        target = resolve(client, member_name)
        listing = change(lambda: client.member_remove(target.raft_address))
    emit(report(listing, f"removed {target.name or target.raft_address}"), settings.write_out)


# -- the programmatic API ------------------------------------------------------------------------


def members_or_local_view(client: Client) -> tuple[MemberListResponse, str]:
    """The leader's member list, or with no leader the first answering node's own view."""
    try:
        return client.member_list(), ""
    except errors.Unavailable:
        for endpoint in client.endpoints:
            try:
                local = client.member_list(endpoint=endpoint)
            except errors.Unavailable:
                continue
            return local, f"no leader: this is {local.answered_by}'s own view"
        raise


def resolve(client: Client, name_or_address: str) -> MemberStatus:
    """The member named ``name_or_address`` (or with that raft address)."""
    listing, _ = members_or_local_view(client)
    for member in listing.members:
        if member.role != "removed" and name_or_address in (member.name, member.raft_address):
            return member
    known = ", ".join(m.name or m.raft_address for m in listing.members if m.role != "removed")
    raise CliError(f"no member named {name_or_address} (members: {known})", INVALID_INPUT)


def change(call: Callable[[], MemberListResponse]) -> MemberListResponse:
    """Runs a membership call; an unknown outcome says where to look."""
    try:
        result = call()
    except errors.OutcomeUnknown as exc:
        raise errors.OutcomeUnknown(f"{exc}; whether the change was made: kv member list") \
            from exc
    return result


def wait_in_sync(client: Client, raft_address: str, timeout: float) -> MemberStatus:
    """Polls the leader until the learner at ``raft_address`` is in sync; ``CliError`` at the
    deadline, saying how far behind it is."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            listing = client.member_list()
            last = next((m for m in listing.members if m.raft_address == raft_address), None)
            if last is None:
                raise CliError(f"{raft_address} is not a member")
            if last.role != "learner" or last.in_sync:
                return last
            behind = f"match index {last.match_index} of commit {listing.commit_index}"
        except errors.Unavailable as exc:
            behind = f"no leader ({exc})"
        if time.monotonic() >= deadline:
            raise CliError(f"{raft_address} did not catch up within {timeout:g}s ({behind})",
                           errors.Unavailable.exit_code)
        time.sleep(POLL)


def promote_when_in_sync(client: Client, raft_address: str,
                         timeout: float) -> MemberListResponse:
    """Waits for the learner to catch up, then promotes it (again if it fell behind between
    the two: under load a learner's lag moves)."""
    deadline = time.monotonic() + timeout
    while True:
        wait_in_sync(client, raft_address, max(deadline - time.monotonic(), 0.0))
        try:
            return change(lambda: client.member_promote(raft_address))
        except errors.MembershipRefused:
            if time.monotonic() >= deadline:
                raise


def report(listing: MemberListResponse, note: str = "") -> Report:
    """The member list in the three output formats; ``note`` is printed after it (stderr)."""
    rows = []
    data = []
    for m in sorted(listing.members, key=_by_name):
        role = f"{m.role} (leader)" if m.is_leader else m.role
        sync = ("yes" if m.in_sync else "no") if m.role == "learner" and listing.from_leader else ""
        match = str(m.match_index) if listing.from_leader else ""
        rows.append([m.name, role, m.raft_address, m.api_address, match,
                     "yes" if m.connected else "no", sync])
        data.append({"name": m.name, "role": m.role, "is_leader": m.is_leader,
                     "raft": m.raft_address, "api": m.api_address,
                     "match_index": m.match_index if listing.from_leader else None,
                     "connected": m.connected,
                     "in_sync": m.in_sync if m.role == "learner" else None})
    notes = progress(listing)
    if note:
        notes.append(note)
    for line in notes:
        click.echo(line, err=True)
    doc = {"cluster_id": listing.cluster_id, "answered_by": listing.answered_by,
           "from_leader": listing.from_leader, "membership_index": listing.membership_index,
           "change_pending": listing.change_pending, "last_change": listing.last_change,
           "commit_index": listing.commit_index, "members": data}
    return Report(doc, ["name", "role", "raft", "api", "match", "connected", "in sync"], rows)


def _by_name(member: MemberStatus) -> tuple[object, ...]:
    """n2 before n10: names compared with their numbers as numbers."""
    return tuple(int(p) if p.isdigit() else p
                 for p in re.split(r"(\d+)", member.name or member.raft_address))


def progress(listing: MemberListResponse) -> list[str]:
    """What is under way: a change not yet committed, learners still catching up."""
    lines = []
    if listing.change_pending:
        lines.append(f"in progress: '{listing.last_change}' (log index "
                     f"{listing.membership_index}, not committed yet)")
    if listing.from_leader:
        for m in listing.members:
            if m.role == "learner" and not m.in_sync:
                lines.append(f"learner {m.name or m.raft_address} is catching up (match index "
                             f"{m.match_index}, commit index {listing.commit_index})")
    return lines
