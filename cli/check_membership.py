"""The ``membership`` fault of ``kv check``: the cluster changes shape while the workloads run.

Each time the nemesis picks this fault it makes **one** change, the next of a cycle that keeps
the cluster at its starting number of voters (``--nodes``, at least 3) or one more:

1. **add** a fresh node (new name, new ports, empty disk) as a learner;
2. **promote** it once it has caught up (``member_cmd.promote_when_in_sync``);
3. **remove** a voter, the leader half the time (it hands over first), and stop it;

then the next add is the fresh node that replaces it. A learner is sometimes removed instead of
promoted (``LEARNER_REMOVAL``): removing a member that is still catching up is a change too.
Kill, pause, partition and power loss, picked in between, then hit a cluster with a learner in
it, or with four voters, or with a leader that just took over from a removed one.

The changes go through exactly what ``kv cluster add-node`` / ``remove-node`` run
(``cli.cluster_nodes.grow`` and ``shrink``), with the harness's own start and stop. The next
change is planned from the leader's member list, not from what the harness believes, so a
change whose outcome was unknown is seen for what it became: a node whose add or removal
failed and that the cluster does not list is then stopped and dropped (``reconcile``). Any
other difference between the harness's nodes and the cluster's members is left for the final
membership check to report. Every change is a ``Fault`` of kind
``membership``, ``change`` naming the step, drawn as a band in the report.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cli import cluster_nodes, member_cmd
from cli.exits import CliError
from kvstore import errors

if TYPE_CHECKING:
    from cli.check_cluster import CheckCluster
    from kvstore.client import Client
    from kvstore.proto.api_pb2 import MemberListResponse, MemberStatus

MIN_VOTERS = 3
"""Never fewer voters than this: with two, one fault stops the cluster and the run means less."""
LEARNER_REMOVAL = 0.2
"""How often a learner is removed instead of promoted."""
LEADER_VICTIM = 0.5
"""How often a removal takes the leader (else a voter at random, which may be the leader)."""
PROMOTE_TIMEOUT = 60.0
"""Seconds a learner gets to catch up (from a snapshot and the log) before the promotion is
given up; the next ``membership`` turn tries again, or removes it."""
SETTLE_TIMEOUT = 10.0
"""Seconds to wait for a leader with no change pending before a change is made (else the
turn is skipped: one change at a time)."""

ADD, PROMOTE, REMOVE = "add", "promote", "remove"
CHANGES = (ADD, PROMOTE, REMOVE)


@dataclass(frozen=True)
class MemberView:
    """The leader's member list in node names: what the next change is planned from."""

    voters: tuple[str, ...]
    learners: tuple[str, ...]
    leader: str | None

    def describe(self) -> str:
        """``voters n1,n2,n3; learners n4; leader n2``."""
        return (f"voters {','.join(self.voters)}; learners {','.join(self.learners) or 'none'}; "
                f"leader {self.leader or 'none'}")


@dataclass(frozen=True)
class Change:
    action: str
    """``ADD``, ``PROMOTE`` or ``REMOVE``."""
    node: str | None = None
    """The member promoted or removed (``None`` for an add: the fresh node gets its name then)."""


def plan(view: MemberView, target_voters: int, rng: random.Random) -> Change:
    """The next change of the cycle: promote (or now and then remove) a learner if there is
    one; remove a voter if there are more than ``target_voters``; else add a fresh learner.

    The cluster never goes below ``max(target_voters, MIN_VOTERS)`` voters."""
    if view.learners:
        learner = rng.choice(sorted(view.learners))
        return Change(REMOVE if rng.random() < LEARNER_REMOVAL else PROMOTE, learner)
    if len(view.voters) > max(target_voters, MIN_VOTERS):
        if view.leader in view.voters and rng.random() < LEADER_VICTIM:
            return Change(REMOVE, view.leader)
        return Change(REMOVE, rng.choice(sorted(view.voters)))
    return Change(ADD)


def label(change: Change, view: MemberView) -> str:
    """How the report names the change: ``add n4 (learner)``, ``promote n4``, ``remove n2
    (leader)``."""
    name = change.node or "a fresh node"
    if change.action == ADD:
        return f"add {name} (learner)"
    if change.action == REMOVE and name == view.leader:
        return f"remove {name} (leader)"
    if change.action == REMOVE and name in view.learners:
        return f"remove {name} (learner)"
    return f"{change.action} {name}"


def view_of(listing: MemberListResponse, names: dict[str, str]) -> MemberView:
    """``listing`` in node names (``names``: raft address -> node id; a member the harness does
    not know keeps the name it was added with)."""
    def name(m: MemberStatus) -> str:
        return names.get(m.raft_address) or m.name

    members = [m for m in listing.members if m.role != "removed"]
    return MemberView(
        voters=tuple(sorted(name(m) for m in members if m.role == "voter")),
        learners=tuple(sorted(name(m) for m in members if m.role == "learner")),
        leader=next((name(m) for m in members if m.is_leader), None),
    )


def _quiet(_line: str) -> None:
    """The progress lines of ``grow``/``shrink``: the report's bands say the same."""


class MembershipDriver:
    """Makes the changes ``plan`` picks on ``cluster`` through ``client`` (which must be one of
    the cluster's followers, so that it always knows the current members)."""

    def __init__(self, cluster: CheckCluster, client: Client, target_voters: int) -> None:
        self.cluster, self.client = cluster, client
        self.target_voters = target_voters
        self.in_doubt: set[str] = set()
        """Nodes whose add or removal failed: members or not, the next look tells."""

    def settled_view(self) -> MemberView | None:
        """The leader's view once no change is pending, after dropping the nodes in doubt that
        it does not list; ``None`` if there is no such moment within ``SETTLE_TIMEOUT``."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                listing = self.client.member_list(timeout=2.0)
            except errors.KVError:
                time.sleep(0.2)
                continue
            if listing.from_leader and not listing.change_pending:
                self.reconcile(listing)
                return view_of(listing, self._names())
            time.sleep(0.2)
        return None

    def reconcile(self, listing: MemberListResponse) -> None:
        """Stops and drops each node in doubt that the cluster does not list as a member (an
        add that did not happen, a removal whose answer was lost); keeps the others."""
        members = {m.raft_address for m in listing.members if m.role != "removed"}
        for node in list(self.cluster.spec.nodes):
            if node.id in self.in_doubt and node.raft not in members:
                self.cluster.forget(node.id)
        self.in_doubt.clear()

    def prepare(self, change: Change) -> Change:
        """``change`` with its node: for an add, a fresh node described and given its proxies
        (in doubt until it is a member)."""
        if change.action != ADD:
            return change
        node = self.cluster.new_node()
        self.in_doubt.add(node.id)
        return Change(ADD, node.id)

    def apply(self, change: Change) -> None:
        """Makes ``change`` (from ``prepare``). Raises on failure (``CliError``, ``KVError``),
        after which ``settled_view`` sees what did happen."""
        assert change.node is not None
        node = self.cluster.node(change.node)
        if change.action == ADD:
            cluster_nodes.grow(self.client, node, lambda: self.cluster.start(node.id),
                               self.cluster.dir.log_file(node.id), promote=False,
                               sync_timeout=PROMOTE_TIMEOUT, note=_quiet)
            self.in_doubt.discard(node.id)
        elif change.action == PROMOTE:
            member_cmd.promote_when_in_sync(self.client, node.raft, PROMOTE_TIMEOUT)
        else:
            self.in_doubt.add(node.id)
            cluster_nodes.shrink(self.client, node, lambda: self.cluster.forget(node.id),
                                 note=_quiet)
            self.in_doubt.discard(node.id)

    def _names(self) -> dict[str, str]:
        return {node.raft: node.id for node in self.cluster.spec.nodes}


def failure(exc: Exception) -> str:
    """One line for a change that failed."""
    if isinstance(exc, (CliError, errors.KVError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
