"""The nemesis of ``kv check``: faults injected at random moments, each held for a while, then
healed. Everything is bounded: one fault at a time, each held a few seconds, none after ``stop``.

``power-loss`` cuts the power of one node, a minority or every node at once (``scope``), half
the time with torn writes, keeps them off for the hold, then boots them; a node that does not
come back is recorded in ``restart_failures`` (a violation in the verdict).

``membership`` is not held and healed: it makes the next membership change of a cycle (add a
learner, promote it, remove a voter or the leader; ``cli.check_membership``) and the change
stays. Its ``Fault`` lasts from the first call to the change's commit (for a promotion, the
catching up included); a change that failed is recorded with ``failed`` set.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cli import check_membership
from cli.check_cluster import CheckCluster
from cli.check_membership import MembershipDriver
from kvstore.check.netns import Netem

FAULT_KINDS = ("kill", "pause", "partition", "power-loss", "membership")
NETNS_FAULT_KINDS = ("netem", "loss")
"""Faults of a real network, only with ``kv check --net netns`` (``cli.check_netns``): ``netem``
(delay with jitter, loss and reordering on one host's link: tc netem, or its user-space stand-in
on kernels without sch_netem) and ``loss`` (nftables dropping a share of one host's frames).
There, ``partition`` is made of blackhole routes."""
POWER_LOSS_SCOPES = ("any", "one", "minority", "all")
"""Which nodes a power loss takes: one node, a minority, every node, or any of the three."""
QUIET = (0.5, 2.0)
"""Seconds between faults (uniform)."""
HOLD = (0.5, 2.5)
"""Seconds a fault is held (uniform)."""
LINK_HOLD = (1.0, 5.0)
"""Seconds a bad link (netem, loss) is held: long enough for TCP and Raft's timeouts to feel it."""
LOSS_PERCENTS = (5, 10, 20, 40)


@dataclass
class Fault:
    kind: str
    target: str
    start_ns: int
    end_ns: int | None = None
    change: str | None = None
    """For a ``membership`` fault: ``add``, ``promote`` or ``remove``."""
    failed: bool = False
    """The membership change was not made (or its outcome was unknown)."""
    members: str | None = None
    """For a ``membership`` fault: the members it was planned from (``MemberView.describe``)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Nemesis(threading.Thread):
    def __init__(self, cluster: CheckCluster, kinds: list[str], rng: random.Random,
                 leader: Callable[[], str | None], power_loss_scope: str = "any",
                 membership: MembershipDriver | None = None) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.cluster, self.kinds, self.rng, self.leader = cluster, kinds, rng, leader
        self.power_loss_scope = power_loss_scope
        if "membership" in kinds and membership is None:
            raise ValueError("the membership fault needs a MembershipDriver")
        self.membership = membership
        self.stop_event = threading.Event()
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.restart_failures: list[str] = []

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(*QUIET)):
            kind = self.rng.choice(self.kinds)
            try:
                getattr(self, "_" + kind.replace("-", "_"))()
            except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                self.cluster.heal()

    def _pick_target(self) -> str:
        """Half the time the leader (the interesting victim), else any node."""
        leader = self.leader() if self.rng.random() < 0.5 else None
        return leader or self.rng.choice(self.cluster.node_ids)

    def _hold(self, fault: Fault, heal: Callable[[], None],
              hold: tuple[float, float] = HOLD) -> None:
        self.faults.append(fault)
        self.stop_event.wait(self.rng.uniform(*hold))
        heal()
        fault.end_ns = time.monotonic_ns()

    def _kill(self) -> None:
        target = self._pick_target()
        self.cluster.kill(target)
        self._hold(Fault("kill", target, time.monotonic_ns()), lambda: self.cluster.start(target))

    def _pause(self) -> None:
        target = self._pick_target()
        self.cluster.pause(target)
        self._hold(Fault("pause", target, time.monotonic_ns()), lambda: self.cluster.resume(target))

    def _partition(self) -> None:
        nodes = [n.raft for n in self.cluster.spec.nodes]
        names = {n.raft: n.id for n in self.cluster.spec.nodes}
        if self.rng.random() < 0.5:
            victim = self.cluster.node(self._pick_target()).raft
            groups = [{victim}, set(nodes) - {victim}]
        else:
            shuffled = self.rng.sample(nodes, len(nodes))
            cut = self.rng.randint(1, len(nodes) - 1)
            groups = [set(shuffled[:cut]), set(shuffled[cut:])]
        self.cluster.network.partition(groups)
        label = " | ".join("{" + ",".join(sorted(names[a] for a in g)) + "}" for g in groups)
        self._hold(Fault("partition", label, time.monotonic_ns()), self.cluster.network.heal)

    def _power_loss(self) -> None:
        ids = self.cluster.node_ids
        scope = self.power_loss_scope
        if scope == "any":
            scope = self.rng.choice(POWER_LOSS_SCOPES[1:])
        if scope == "all":
            targets = list(ids)
        else:
            size = 1 if scope == "one" else (len(ids) - 1) // 2
            first = self._pick_target()
            targets = [first, *self.rng.sample([n for n in ids if n != first], size - 1)]
        torn = self.rng.randrange(2**31) if self.rng.random() < 0.5 else None
        self.cluster.power_off(targets, torn_seed=torn)
        label = ",".join(sorted(targets)) + (" (torn)" if torn is not None else "")
        self._hold(Fault("power-loss", label, time.monotonic_ns()),
                   lambda: self.restart_failures.extend(self.cluster.power_on(sorted(targets))))

    def _membership(self) -> None:
        assert self.membership is not None
        view = self.membership.settled_view()
        if view is None:
            self.errors.append("membership: no leader with no change pending within "
                               f"{check_membership.SETTLE_TIMEOUT:.0f} s; no change made")
            return
        change = check_membership.plan(view, self.membership.target_voters, self.rng)
        fault = Fault("membership", check_membership.label(change, view), time.monotonic_ns(),
                      change=change.action, members=view.describe())
        self.faults.append(fault)
        try:
            change = self.membership.prepare(change)
            fault.target = check_membership.label(change, view)
            self.membership.apply(change)
        except Exception as exc:  # noqa: BLE001 - recorded; the next turn sees what happened
            fault.failed = True
            fault.target += " (failed)"
            self.errors.append(f"membership {fault.target}: {check_membership.failure(exc)}")
        fault.end_ns = time.monotonic_ns()

    def membership_changes(self) -> dict[str, int]:
        """The membership changes made, by step (``remove-leader`` counts the leader's)."""
        made = [f for f in self.faults if f.kind == "membership" and not f.failed]
        counts = {change: sum(1 for f in made if f.change == change)
                  for change in check_membership.CHANGES}
        counts["remove-leader"] = sum(1 for f in made if f.target.endswith("(leader)"))
        return counts

    # -- faults of a real network (kv check --net netns) -------------------------------------------

    def _pick_link(self) -> str:
        """The host whose link goes bad: a quarter of the time the client's (so requests and
        answers are lost and retried), else a node (``_pick_target``)."""
        return "client" if self.rng.random() < 0.25 else self._pick_target()

    def _netem(self) -> None:
        host = self._pick_link()
        impairment = random_netem(self.rng)
        links = self.cluster.network
        how = links.impair(host, impairment, self.rng.randrange(2**31))  # type: ignore[union-attr]
        self._hold(Fault("netem", f"{host}: {impairment} ({how})", time.monotonic_ns()),
                   lambda: links.unimpair(host), LINK_HOLD)  # type: ignore[union-attr]

    def _loss(self) -> None:
        host = self._pick_link()
        percent = self.rng.choice(LOSS_PERCENTS)
        links = self.cluster.network
        links.drop(host, percent)  # type: ignore[union-attr]
        self._hold(Fault("loss", f"{host}: {percent}%", time.monotonic_ns()),
                   lambda: links.undrop(host), LINK_HOLD)  # type: ignore[union-attr]


def random_netem(rng: random.Random) -> Netem:
    """Delay 20-200 ms with up to half as much jitter; half the time up to 10% loss, half the
    time up to 30% reordering."""
    delay = rng.randint(20, 200)
    return Netem(delay_ms=delay, jitter_ms=rng.randint(0, delay // 2),
                 loss_percent=rng.choice((0, rng.randint(1, 10))),
                 reorder_percent=rng.choice((0, rng.randint(5, 30))))
