"""One ``kv check`` run: a cluster, workloads, a nemesis, then the verdict.

1. Start the nodes (their Raft links through fault proxies) and wait for a leader.
2. Run the workloads' clients for the duration while the nemesis injects faults.
3. Stop the faults, heal everything, wait until every replica has applied the same index and
   reports the same state digest.
4. Read the final values, run each workload's checker, the convergence check over the
   current members, and the membership check (those members are the nodes the harness runs).

With the ``membership`` fault the member set changes during the run: every client follows the
current members' endpoints (``CheckCluster.follow``), and a removed node is stopped, so only
the current members must converge.

Everything is seeded (``--seed``): the choice of operations and of faults. Timing is not, so two
runs with one seed are alike, not identical.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.check_cluster import CheckCluster
from cli.check_membership import MembershipDriver
from cli.nemesis import Nemesis
from kvstore import errors
from kvstore.check import history as history_io
from kvstore.check.history import Op, Recorder
from kvstore.check.netns import Topology
from kvstore.check.verdict import check_convergence, check_membership, check_restarts
from kvstore.check.report import write_report
from kvstore.check.workloads import OP_DEADLINE, WORKLOADS, Worker, run_workers
from kvstore.client import Client
from kvstore.proto.api_pb2 import NodeStatus

CONVERGE_TIMEOUT = 60.0
LEADER_TIMEOUT = 30.0
FINAL_PROCESS = 10_000
"""Process id of the reader that takes the final values after healing."""
FINAL_LABEL = "final reads"
FINAL_NOTE = (f"The last lane, p{FINAL_PROCESS} {FINAL_LABEL}, is the reader that takes every "
              "workload's final values after the faults healed: the checkers judge the end "
              "state by these reads.")

SUMMARY_LABELS = {
    "verdict": "Verdict",
    "seed": "Seed (--seed repeats the choices)",
    "workloads": "Workloads",
    "faults": "Faults chosen",
    "duration_s": "Duration (s)",
    "clients_per_workload": "Clients per workload",
    "nodes": "Nodes",
    "net": "Network",
    "planted_bug": "Planted bug",
    "ops_ok": "Operations ok",
    "ops_failed": "Operations failed (certainly not applied)",
    "ops_unknown": "Operations with an unknown outcome",
    "faults_injected": "Faults injected",
    "membership_changes": "Membership changes made",
    "preloaded_keys": "Keys preloaded (--preload)",
    "preload_s": "Preload time (s)",
    "snapshots": "Snapshots of the final members (written, loaded) and the longest tick gap",
    "nemesis_errors": "Errors injecting faults",
    "violations": "Violations, per checker",
    "report": "Report",
}
"""The summary's keys in words, for the HTML report (verdict.json keeps the names)."""


@dataclass
class CheckOptions:
    workloads: list[str]
    faults: list[str]
    duration: float
    seed: int
    clients: int = 4
    nodes: int = 3
    keys: int = 4
    snapshot_count: int = 500
    planted_bug: str | None = None
    report_dir: Path | None = None
    fsync: bool = True
    """The nodes' durable mode (``kv node run --fsync``, the default)."""
    power_loss_scope: str = "any"
    topology: Topology | None = None
    """With ``--net netns``: the network the cluster runs in (``cli.check_netns``)."""
    preload: int = 0
    """Keys of 100 B loaded before the workloads start (``cli.bench.preload``), so snapshots of
    a large state are taken, and installed on the nodes the membership fault adds, in the run."""


@dataclass
class CheckOutcome:
    valid: bool
    summary: dict[str, Any]
    violations: list[Any] = field(default_factory=list)
    report: Path | None = None


def run_check(options: CheckOptions, progress: Callable[[str], None]) -> CheckOutcome:
    with tempfile.TemporaryDirectory(prefix="kv-check-") as tmp:
        cluster = CheckCluster(Path(tmp) / "cluster", options.nodes,
                               snapshot_count=options.snapshot_count, fsync=options.fsync,
                               planted_bug=options.planted_bug,
                               power_loss="power-loss" in options.faults,
                               topology=options.topology)
        clients: list[Client] = []
        try:
            cluster.start_all()
            admin = cluster.client(timeout=10)
            clients.append(admin)
            cluster.follow(admin)
            _wait(lambda: cluster.leader_id(admin), LEADER_TIMEOUT, "a leader")
            preloaded = _preload(options, admin, progress)
            return _run(options, cluster, admin, clients, progress, preloaded)
        finally:
            for client in clients:
                client.close()
            cluster.close()


def _preload(options: CheckOptions, admin: Client,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Loads ``options.preload`` keys (none: nothing); returns what the summary says of it."""
    if not options.preload:
        return {}
    from cli.bench.preload import preload  # only a run with --preload needs it

    shown = [-1]

    def loaded(keys: int, _sessions: int) -> None:
        tenth = keys * 10 // options.preload
        if tenth != shown[0]:  # a line per tenth: no flood when stderr is not a terminal
            shown[0] = tenth
            progress(f"preloading: {keys:,}/{options.preload:,} keys")

    done = preload(admin, options.preload, seed=options.seed, progress=loaded)
    return {"preloaded_keys": done.keys, "preload_s": round(done.seconds, 1)}


def _run(options: CheckOptions, cluster: CheckCluster, admin: Client, clients: list[Client],
         progress: Callable[[str], None], preloaded: dict[str, Any]) -> CheckOutcome:
    recorder = Recorder()
    workloads = [WORKLOADS[name](options.keys) for name in options.workloads]
    stop = threading.Event()
    threads = []
    labels: dict[int, str] = {FINAL_PROCESS: FINAL_LABEL}
    for number, workload in enumerate(workloads):
        mine = [cluster.client(timeout=5) for _ in range(options.clients)]
        clients += mine
        for client in mine:
            cluster.follow(client)
        first = number * options.clients
        threads += run_workers(workload, mine, recorder, options.seed, stop, first_process=first)
        labels |= {first + i: workload.name for i in range(options.clients)}
    membership = (MembershipDriver(cluster, admin, options.nodes)
                  if "membership" in options.faults else None)
    nemesis = Nemesis(cluster, options.faults, random.Random(f"{options.seed}/nemesis"),
                      lambda: cluster.leader_id(admin), options.power_loss_scope, membership)
    if options.faults:
        nemesis.start()
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < options.duration:
            time.sleep(min(1.0, options.duration - elapsed))
            progress(_progress_line(elapsed, options.duration, recorder.history(), nemesis))
    finally:  # also on Ctrl-C or SIGTERM: no client or fault outlives the cluster's files
        if options.faults:
            nemesis.stop()
        stop.set()
        for thread in threads:
            thread.join(OP_DEADLINE + 5)

    cluster.heal()
    if membership is not None:
        membership.settled_view()  # drops a node whose last add or removal failed
    statuses = _converged(cluster, admin)
    members = _final_members(admin)
    finals = Worker(FINAL_PROCESS, admin, recorder, random.Random(0))
    for workload in workloads:
        workload.final_reads(finals)

    ops = recorder.history()
    results = {w.name: w.check([op for op in ops if op.key.startswith(w.name + "/")])
               for w in workloads}
    results["convergence"] = check_convergence({n: s.digest for n, s in statuses.items()})
    results["membership"] = check_membership(
        {node.raft: node.id for node in cluster.spec.nodes}, members, options.nodes)
    restarted = sum(len(f.target.split(" ")[0].split(","))
                    for f in nemesis.faults if f.kind == "power-loss")
    results["restarts"] = check_restarts(nemesis.restart_failures, restarted)
    violations = [v for result in results.values() for v in result.violations]
    valid = all(result.valid for result in results.values())
    summary = _summary(options, ops, nemesis, results, valid) | preloaded
    summary["snapshots"] = _snapshots(statuses)
    report = _write(options, ops, nemesis, violations, summary, labels)
    return CheckOutcome(valid=valid, summary=summary, violations=violations, report=report)


def _converged(cluster: CheckCluster, admin: Client) -> dict[str, NodeStatus]:
    """Each node's status with its digest once all report the same applied index (or whatever
    they say at the deadline, which the convergence check then judges)."""
    latest: dict[str, NodeStatus] = {}

    def converged() -> bool:
        statuses = {}
        for node in cluster.spec.nodes:
            try:
                statuses[node.id] = admin.status(node.api, with_digest=True, timeout=5)
            except errors.Unavailable:
                return False
        latest.clear()
        latest.update(statuses)
        leaders = [s for s in statuses.values() if s.role == "leader"]
        applied = {s.applied_index for s in statuses.values()}
        digests = {s.digest for s in statuses.values()}
        return len(leaders) == 1 and len(applied) == 1 and len(digests) == 1

    try:
        _wait(converged, CONVERGE_TIMEOUT, "the replicas to converge")
    except TimeoutError:
        pass
    return dict(latest)


def _snapshots(statuses: dict[str, NodeStatus]) -> dict[str, Any]:
    """What the current members did with snapshots in the run: per node, snapshots written and
    loaded (at a restart or from the leader), and the longest gap of any tick loop."""
    return {
        "written": {n: s.snapshots_written for n, s in sorted(statuses.items())},
        "loaded": {n: s.snapshots_loaded for n, s in sorted(statuses.items())},
        "tick_gap_max_ms": round(max((s.tick_gap_max_ms for s in statuses.values()),
                                     default=0.0), 1),
    }


def _final_members(admin: Client) -> list[tuple[str, str, str]] | None:
    """The leader's member list as (name, raft address, role); ``None`` if none answered."""
    try:
        listing = admin.member_list(timeout=CONVERGE_TIMEOUT / 2)
    except errors.KVError:
        return None
    return [(m.name, m.raft_address, m.role) for m in listing.members]


def _summary(options: CheckOptions, ops: list[Op], nemesis: Nemesis, results: dict[str, Any],
             valid: bool) -> dict[str, Any]:
    statuses = Counter(op.status for op in ops)
    return {
        "verdict": "valid" if valid else "INVALID",
        "seed": options.seed,
        "workloads": ",".join(options.workloads),
        "faults": ",".join(options.faults) or "none",
        "duration_s": options.duration,
        "clients_per_workload": options.clients,
        "nodes": options.nodes,
        "net": (f"netns, {options.topology.address('n1')}/24" if options.topology
                else "loopback, a proxy on each Raft link"),
        "fsync": options.fsync,
        "planted_bug": options.planted_bug or "none",
        "ops_ok": statuses["ok"],
        "ops_failed": statuses["fail"],
        "ops_unknown": statuses["unknown"],
        "faults_injected": dict(Counter(f.kind for f in nemesis.faults)),
        "membership_changes": nemesis.membership_changes(),
        "nemesis_errors": nemesis.errors,
        "violations": {name: len(r.violations) for name, r in results.items()},
    }


def _write(options: CheckOptions, ops: list[Op], nemesis: Nemesis, violations: list[Any],
           summary: dict[str, Any], labels: dict[int, str]) -> Path | None:
    if options.report_dir is None:
        return None
    options.report_dir.mkdir(parents=True, exist_ok=True)
    history_io.dump(ops, options.report_dir / "history.jsonl")
    (options.report_dir / "faults.json").write_text(
        json.dumps([f.to_dict() for f in nemesis.faults], indent=2))
    (options.report_dir / "verdict.json").write_text(json.dumps(summary, indent=2, default=str))
    return write_report(options.report_dir / "report.html", ops,
                        [f.to_dict() for f in nemesis.faults], violations, summary,
                        process_labels=labels, summary_labels=SUMMARY_LABELS,
                        timeline_note=FINAL_NOTE)


def _progress_line(elapsed: float, duration: float, ops: list[Op], nemesis: Nemesis) -> str:
    statuses = Counter(op.status for op in ops if op.return_ns is not None)
    current = next((f for f in reversed(nemesis.faults) if f.end_ns is None), None)
    fault = f"{current.kind} {current.target}" if current else "none"
    return (f"[{elapsed:5.1f}/{duration:.0f}s] ok {statuses['ok']} failed {statuses['fail']} "
            f"unknown {statuses['unknown']} | faults {len(nemesis.faults)} (now: {fault})")


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
