"""What a checker returns, and the one check that needs no history: replica convergence.

Every checker returns a ``CheckResult``. ``valid`` is True only when the checker proved the
history correct; a result is never valid "by default". When a checker gives up (the
linearizability search ran out of budget) it says so with a violation of kind ``"budget"``:
the result is not valid, but nothing wrong was found either. ``CheckResult.outcome`` names the
three cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

BUDGET = "budget"
"""Violation kind of an inconclusive search: neither proved correct nor shown wrong."""

DIVERGENCE = "divergence"
"""Violation kind of replicas whose state digests differ."""

RESTART_FAILED = "restart-failed"
"""Violation kind of a node that did not come back after a fault (e.g. a power loss)."""

MEMBERSHIP = "membership"
"""Violation kind of a final member table that is not the one the harness made."""


@dataclass(frozen=True)
class Violation:
    """One thing wrong in a history (or, for kind ``"budget"``, one thing left undecided)."""

    kind: str
    key: str
    message: str
    ops: list[int] = field(default_factory=list)
    """Indexes (``Op.index``) of the operations that show the problem, a handful at most."""


@dataclass(frozen=True)
class CheckResult:
    valid: bool
    violations: list[Violation]
    stats: dict[str, int]

    @classmethod
    def of(cls, violations: list[Violation], stats: dict[str, int]) -> CheckResult:
        """The result of a checker that found ``violations`` (none: the history is valid)."""
        return cls(valid=not violations, violations=violations, stats=stats)

    @property
    def outcome(self) -> Literal["valid", "invalid", "unknown"]:
        """``"unknown"`` when the only violations are exhausted search budgets."""
        if self.valid:
            return "valid"
        if all(v.kind == BUDGET for v in self.violations):
            return "unknown"
        return "invalid"


def check_convergence(digests: Mapping[str, str]) -> CheckResult:
    """All replicas ended with the same state: their digests (node name -> digest) are equal.

    Raft's state machine safety property says every replica applies the same commands in the
    same order, and our ``apply`` is deterministic, so once every replica has applied the
    whole log their digests must be equal. The harness must compare them only after the
    replicas caught up; a lagging replica is reported as divergent. No digest at all (no
    replica answered) proves nothing, so it is not valid either.
    """
    if not digests:
        return CheckResult.of([Violation(DIVERGENCE, "", "no replica reported a digest: "
                                         "convergence could not be checked")],
                              {"nodes": 0, "distinct_digests": 0})
    nodes_by_digest: dict[str, list[str]] = {}
    for node, digest in sorted(digests.items()):
        nodes_by_digest.setdefault(digest, []).append(node)
    stats = {"nodes": len(digests), "distinct_digests": len(nodes_by_digest)}
    if len(nodes_by_digest) == 1:
        return CheckResult.of([], stats)
    groups = "; ".join(
        f"{', '.join(nodes)}: {digest}" for digest, nodes in sorted(nodes_by_digest.items())
    )
    message = f"the replicas hold {len(nodes_by_digest)} different states ({groups})"
    return CheckResult.of([Violation(DIVERGENCE, "", message)], stats)


def check_restarts(failures: list[str], restarts: int) -> CheckResult:
    """Every node restarted after its faults: ``failures`` has one line per node that did not.

    A node must restart from any crash state, or refuse with a message that names the way out;
    in a test run nobody is there to take it, so a refusal counts as a failure too."""
    return CheckResult.of([Violation(RESTART_FAILED, "", failure) for failure in failures],
                          {"restarts": restarts, "failed": len(failures)})


def check_membership(nodes: Mapping[str, str], members: Sequence[tuple[str, str, str]] | None,
                     min_voters: int) -> CheckResult:
    """The cluster's final members are the nodes the harness runs, with ``min_voters`` voters
    or more.

    ``nodes`` maps each running node's Raft address to its name; ``members`` is the leader's
    member list as (name, raft address, role), ``None`` if no leader answered. The convergence
    check compares the running nodes only (a removed node is stopped), so it means something
    only if they are exactly the members: a member the harness removed (or never added) that
    is still listed, or a running node the cluster dropped, is a violation.
    """
    if members is None:
        return CheckResult.of([Violation(MEMBERSHIP, "", "no leader answered the member list: "
                                         "the final membership could not be checked")],
                              {"voters": 0, "learners": 0})
    listed = {raft: (name, role) for name, raft, role in members if role != "removed"}
    voters = sum(1 for _, role in listed.values() if role == "voter")
    violations = [
        Violation(MEMBERSHIP, "", f"{name} ({raft}) is still a {role}, but the harness removed "
                  "it or never added it")
        for raft, (name, role) in sorted(listed.items()) if raft not in nodes
    ]
    violations += [
        Violation(MEMBERSHIP, "", f"{name} ({raft}) runs, but the cluster does not list it as a "
                  "member")
        for raft, name in sorted(nodes.items()) if raft not in listed
    ]
    if voters < min_voters:
        violations.append(Violation(MEMBERSHIP, "", f"{voters} voters at the end, fewer than "
                                    f"{min_voters}"))
    return CheckResult.of(violations, {"voters": voters, "learners": len(listed) - voters})
