"""A large state under write load: do snapshots stall the cluster? (issue 9, item 4)

Run: ``flock /tmp/kv-heavy.lock .venv/bin/python benchmarks/big_state.py`` (1M keys of 100 B and
4,096 sessions by default; ``--keys 50000`` for a quick look). It starts a fresh local 3-node
cluster, preloads it through the log (``cli.bench.preload``: ``put_many`` entries), then runs
closed-loop writers (each with its own session, overwriting preloaded keys) through three phases:

1. **steady**: writes while the nodes take snapshots as their logs reach ``--snapshot-count``;
2. **replace**: a follower is SIGKILLed and its data directory deleted, and it is replaced as
   the README says (``cli.cluster_nodes``: a new node joins as a learner and is promoted once
   caught up, the lost one is removed): the new member must catch up by installing the
   leader's snapshot while the writes go on;
3. **after**: more writes once it has caught up.

A monitor polls every node's ``Status`` every 50 ms throughout, and the report says: leader
changes (terms and leaders seen), the longest tick gap of each node (from its own measure), each
write's latency classified by whether any node was taking, sending, receiving or restoring a
snapshot while it was in flight, p99 with and without (and the same for the leader's own
snapshots alone), snapshot times reported by the nodes, the
new member's install time (from its start until it is promoted, having restored the snapshot and
applied what the leader had committed when the follower was lost), the dump's size on disk, and each node's RSS (now and
peak). ``--snapshots-on-tick-thread`` runs the same with the old placement (both done on the Raft
thread, as PySyncObj calls them) as the control; ``--compare`` runs both, one after the other.
Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import processes  # noqa: E402
from cli.bench.common import with_parent_death  # noqa: E402
from cli.bench.preload import preload, preload_key  # noqa: E402
from cli.cluster_nodes import grow, shrink  # noqa: E402
from cli.exits import CliError  # noqa: E402
from cli.cluster_dir import ClusterDir  # noqa: E402
from kvstore import ops  # noqa: E402
from kvstore.client import Client  # noqa: E402
from kvstore.errors import KVError  # noqa: E402

POLL = 0.05
ORPHANS_DIE = with_parent_death([])
"""How the nodes are started: SIGKILLed should the benchmark die without stopping them."""
SNAPSHOT_STATES = ("writing", "receiving", "restoring", "sending")


# -- the writers (worker processes, started with spawn) -------------------------------------


def writer_process(endpoints: list[str], threads: int, keys: int, stop: Any, seed: int,
                   out: Any, niceness: int) -> None:
    """Closed-loop puts from ``threads`` clients; sends back (start, end, ok) per write."""
    if niceness:
        lower_priority(niceness)
    records: list[tuple[float, float, bool]] = []
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        rng = random.Random(f"{seed}:{n}")
        mine: list[tuple[float, float, bool]] = []
        with Client(endpoints, timeout=10) as client:
            session = None
            while not stop.is_set():
                start = time.monotonic()
                try:
                    if session is None:
                        session = client.sync_get_session(timeout=10)
                    client.sync_propose(session, ops.put(preload_key(rng.randrange(keys)),
                                                         rng.randbytes(50).hex().encode()),
                                        timeout=10)
                    session.proposal_completed()
                    mine.append((start, time.monotonic(), True))
                except KVError:
                    mine.append((start, time.monotonic(), False))
                    time.sleep(0.05)
        with lock:
            records.extend(mine)

    pool = [threading.Thread(target=client_loop, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.send(records)
    out.close()


def lower_priority(niceness: int) -> None:
    """``--writers-nice``: the writers stand in for clients on other machines. A nice value alone
    ranks a process only among those of its session when Linux's autogroup
    (``sched_autogroup_enabled``) is on, and the nodes share this benchmark's session
    (``cli.processes.APART``), so the writers get a session of their own, and its group the
    nice value too."""
    os.setsid()
    try:
        Path("/proc/self/autogroup").write_text(str(niceness))
    except OSError:
        pass  # no autogroup here: the nice value below is all there is
    os.nice(niceness)


class Writers:
    def __init__(self, endpoints: list[str], clients: int, keys: int, niceness: int) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        procs = min(clients, 2 * (os.cpu_count() or 1))
        self._workers = []
        for p in range(procs):
            threads = clients // procs + (1 if p < clients % procs else 0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=writer_process,
                               args=(endpoints, threads, keys, self._stop, p, send, niceness),
                               daemon=True)
            proc.start()
            self._workers.append((proc, receive))

    def results(self) -> list[tuple[float, float, bool]]:
        """Stops the writers and collects what they recorded."""
        self._stop.set()
        records: list[tuple[float, float, bool]] = []
        for proc, receive in self._workers:
            if receive.poll(60):
                records += receive.recv()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        return records


# -- the monitor ----------------------------------------------------------------------------


class Monitor:
    """Polls every node's status; keeps the snapshot intervals, terms, leaders and gaps."""

    def __init__(self, client: Client, nodes: dict[str, str]) -> None:
        self._client = client
        self._nodes = nodes
        self.samples: list[tuple[float, str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for node_id, endpoint in list(self._nodes.items()):
                try:
                    status = self._client.status(endpoint, timeout=0.5)
                except KVError:
                    status = None
                self.samples.append((time.monotonic(), node_id, status))
            self._stop.wait(POLL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot_intervals(self, since: float,
                           only: str | None = None) -> list[tuple[float, float]]:
        """When some node was busy with a snapshot, as merged [start, end] intervals: the
        samples that report snapshot work (each standing for a polling period either side),
        and, for each snapshot written or loaded, the span its node reports it took, ending
        at the first sample that counts it (a node doing it on its tick thread cannot answer
        while it is busy, so only this second kind sees those)."""
        spans: list[tuple[float, float]] = []
        seen: dict[str, tuple[int, int]] = {}
        for t, node_id, s in self.samples:
            if s is None or (only is not None and node_id != only):
                continue
            counts = (s.snapshots_written, s.snapshots_loaded)
            before = seen.get(node_id)
            seen[node_id] = counts
            if t < since:
                continue
            if any(a.split(":")[0] in SNAPSHOT_STATES for a in s.snapshot):
                spans.append((t - POLL, t + POLL))
            if before is not None and counts[0] > before[0]:
                spans.append((t - s.snapshot_write_seconds - 2 * POLL, t))
            if before is not None and counts[1] > before[1]:
                spans.append((t - s.snapshot_restore_seconds - 2 * POLL, t))
        merged: list[list[float]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(a, b) for a, b in merged]

    def leader_view(self, since: float) -> dict[str, Any]:
        terms: set[int] = set()
        leaders: list[str] = []
        for t, node_id, s in self.samples:
            if t < since or s is None:
                continue
            if s.term:  # 0: a joining node that has not heard from the leader yet
                terms.add(s.term)
            if s.role == "leader" and (not leaders or leaders[-1] != node_id):
                leaders.append(node_id)
        return {"terms": sorted(terms), "leaders_in_turn": leaders,
                "leader_changes": max(len(terms) - 1, 0)}

    def max_gap(self, node_id: str, since: float) -> float:
        return max((s.tick_gap_recent_ms for t, n, s in self.samples
                    if n == node_id and t >= since and s is not None), default=0.0)


# -- the run --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def classify(records: list[tuple[float, float, bool]],
             intervals: list[tuple[float, float]]) -> dict[str, Any]:
    during, outside, errors = [], [], 0
    for start, end, ok in records:
        if not ok:
            errors += 1
            continue
        overlaps = any(start < b and end > a for a, b in intervals)
        (during if overlaps else outside).append((end - start) * 1e3)
    return {
        "writes": len(records), "errors": errors,
        "during_snapshot": {"n": len(during), "p50_ms": percentile(during, 50),
                            "p99_ms": percentile(during, 99), "max_ms": max(during, default=None)},
        "no_snapshot": {"n": len(outside), "p50_ms": percentile(outside, 50),
                        "p99_ms": percentile(outside, 99), "max_ms": max(outside, default=None)},
    }


def rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields.get("VmRSS", 0), 1), "peak_rss_mb": round(fields.get("VmHWM", 0), 1)}


def status_of(client: Client, endpoint: str) -> Any:
    try:
        return client.status(endpoint, timeout=2)
    except KVError:
        return None


def wait_until(what: str, predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)
    return time.monotonic() - start


def run(args: argparse.Namespace, on_tick_thread: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="big-state-", dir="/tmp"))
    cluster = ClusterDir(root / "cluster")
    spec = cluster.create(3, snapshot_count=args.snapshot_count)
    cluster.prepare_node_dirs(spec)
    extra = ["--snapshots-on-tick-thread"] if on_tick_thread else []
    procs: dict[str, subprocess.Popen[bytes]] = {}
    nodes = {n.id: n.api for n in spec.nodes}
    report: dict[str, Any] = {"mode": "on the tick thread" if on_tick_thread else "background",
                              "keys": args.keys, "sessions": args.sessions,
                              "clients": args.clients, "writers_nice": args.writers_nice,
                              "snapshot_count": args.snapshot_count}
    try:
        for node in spec.nodes:
            procs[node.id] = processes.start_node(cluster, spec, node, extra, ORPHANS_DIE)
        with Client(spec.endpoints, timeout=30) as client:
            wait_until("a leader", lambda: leader_of(client, nodes) is not None, 30)
            print(f"[{report['mode']}] preloading {args.keys:,} keys and {args.sessions:,} "
                  "sessions ...", flush=True)
            loaded = preload(client, args.keys, sessions=args.sessions, seed=args.seed,
                             timeout=120)
            report["preload_seconds"] = round(loaded.seconds, 1)
            monitor = Monitor(Client(spec.endpoints, timeout=5), nodes)
            started = time.monotonic()
            writers = Writers(spec.endpoints, args.clients, args.keys, args.writers_nice)
            print(f"[{report['mode']}] steady writes for {args.steady:.0f} s ...", flush=True)
            time.sleep(args.steady)
            leader = leader_of(client, nodes) or spec.nodes[0].id
            victim = next(n for n in spec.nodes if n.id != leader)
            print(f"[{report['mode']}] losing follower {victim.id} with its disk; replacing it "
                  "with a new member ...", flush=True)
            procs[victim.id].send_signal(signal.SIGKILL)
            procs[victim.id].wait(10)
            shutil.rmtree(cluster.data_dir(victim))
            target = status_of(client, nodes[leader])
            newcomer = cluster.new_node(spec)
            spec = replace(spec, nodes=(*spec.nodes, newcomer))
            cluster.save(spec)
            cluster.prepare_node_dirs(spec)
            nodes[newcomer.id] = newcomer.api

            def start() -> subprocess.Popen[bytes]:
                procs[newcomer.id] = processes.start_node(cluster, spec, newcomer, extra,
                                                           ORPHANS_DIE)
                return procs[newcomer.id]

            wiped_at = time.monotonic()
            install: float | None = None
            try:  # started with --join, added as a learner, promoted once caught up
                grow(client, newcomer, start, cluster.log_file(newcomer.id), promote=True,
                     sync_timeout=args.wipe_timeout)
                promoted = time.monotonic() - wiped_at  # it holds the log: it may vote

                def caught_up() -> bool:  # its state restored and the log applied past target
                    s = status_of(client, newcomer.api)  # (from the log alone, if the leader's
                    return (s is not None and "restoring" not in s.snapshot  # still holds it all)
                            and s.applied_index >= target.commit_index)
                wait_until("the new member to catch up", caught_up, args.wipe_timeout)
                install = time.monotonic() - wiped_at
                report["promoted_after_seconds"] = round(promoted, 1)
                print(f"[{report['mode']}] {newcomer.id} promoted after {promoted:.1f} s, caught "
                      f"up after {install:.1f} s; writes go on ...", flush=True)
                shrink(client, victim, lambda: None)
                del nodes[victim.id]
            except (CliError, RuntimeError) as exc:
                print(f"[{report['mode']}] {newcomer.id}: {exc}", flush=True)
            time.sleep(args.after)
            records = writers.results()
            monitor.stop()
            ended = time.monotonic()
            intervals = monitor.snapshot_intervals(started)
            report["latency"] = classify(records, intervals)
            final_leader = leader_of(client, nodes)
            if final_leader is not None:  # the leader's own snapshots, the others' left out
                report["latency_leader_snapshot"] = {
                    "leader": final_leader,
                    **classify(records, monitor.snapshot_intervals(started, final_leader))}
            report["snapshot_busy_seconds"] = round(sum(b - a for a, b in intervals), 1)
            report["writes_per_second"] = round(len(records) / (ended - started), 1)
            report["leaders"] = monitor.leader_view(started)
            victim_status = status_of(client, newcomer.api)
            report["install"] = {
                "node": newcomer.id,
                "seconds_to_catch_up": round(install, 2) if install is not None else None,
                "restore_seconds_on_node": victim_status.snapshot_restore_seconds if victim_status else None,
            }
            nodes_report = {}
            for node in spec.nodes:
                if node.id == victim.id:
                    continue
                s = status_of(client, node.api)
                dump = cluster.data_dir(node) / "raft.dump"
                nodes_report[node.id] = {
                    "role": s.role if s else None,
                    "tick_gap_max_ms_since_start": round(s.tick_gap_max_ms, 1) if s else None,
                    "tick_gap_max_ms_during_writes": round(monitor.max_gap(node.id, started), 1),
                    "gc_pause_max_ms": round(s.gc_pause_max_ms, 1) if s else None,
                    "snapshots_written": s.snapshots_written if s else None,
                    "snapshots_loaded": s.snapshots_loaded if s else None,
                    "last_snapshot_seconds": round(s.snapshot_write_seconds, 2) if s else None,
                    "dump_mib": round(dump.stat().st_size / 2**20, 1) if dump.exists() else None,
                    **rss_mb(procs[node.id].pid),
                }
            report["nodes"] = nodes_report
            report["long_tick_gaps"] = long_gaps(cluster, spec, intervals, started)
            report["digests_equal"] = len({status_of(client, api).digest
                                           for api in nodes.values()
                                           if wait_digest(client, api)}) == 1
            report["wiped_at"] = round(wiped_at - started, 1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if args.logs:
            kept = args.logs / ("tick-thread" if on_tick_thread else "background")
            kept.mkdir(parents=True, exist_ok=True)
            for node in spec.nodes:
                if cluster.log_file(node.id).exists():
                    shutil.copy(cluster.log_file(node.id), kept / f"{node.id}.log")
        shutil.rmtree(root, ignore_errors=True)
    return report


GAP_LINE = re.compile(r"^(\S+ \S+) \S+ WARNING kvstore.node.health: the tick thread made no "
                      r"pass for (\d+) ms")


def long_gaps(cluster: ClusterDir, spec: Any, intervals: list[tuple[float, float]],
              since: float) -> dict[str, Any]:
    """The passes over 100 ms each node logged, split by whether a snapshot was in progress
    on some node while they lasted (the machine's own load makes some without one)."""
    offset = time.time() - time.monotonic()  # log lines carry wall-clock times
    out = {}
    for node in spec.nodes:
        during, outside = [], []
        for line in cluster.log_file(node.id).read_text(errors="replace").splitlines():
            match = GAP_LINE.match(line)
            if not match:
                continue
            end = time.mktime(time.strptime(match[1].split(",")[0], "%Y-%m-%d %H:%M:%S"))
            end += int(match[1].split(",")[1]) / 1e3 - offset
            gap = int(match[2])
            if end < since:
                continue
            start = end - gap / 1e3
            overlaps = any(start < b and end > a for a, b in intervals)
            (during if overlaps else outside).append(gap)
        out[node.id] = {"during_snapshot": {"count": len(during), "max_ms": max(during, default=0)},
                        "no_snapshot": {"count": len(outside), "max_ms": max(outside, default=0)}}
    return out


def wait_digest(client: Client, endpoint: str) -> bool:
    try:
        return bool(client.status(endpoint, with_digest=True, timeout=60).digest)
    except KVError:
        return False


def leader_of(client: Client, nodes: dict[str, str]) -> str | None:
    for node_id, endpoint in nodes.items():
        s = status_of(client, endpoint)
        if s is not None and s.role == "leader":
            return node_id
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--snapshot-count", type=int, default=2000,
                        help="log entries between snapshots (each entry is a batch of writes)")
    parser.add_argument("--steady", type=float, default=40.0, help="seconds of writes before the wipe")
    parser.add_argument("--after", type=float, default=15.0, help="seconds of writes after it")
    parser.add_argument("--wipe-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--writers-nice", type=int, default=0, metavar="N",
                        help="run the writers at this nice value: they stand in for clients on "
                             "other machines, and at the nodes' priority they take the cores of "
                             "this one from the Raft threads (default 0: as they would)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--snapshots-on-tick-thread", action="store_true",
                      help="the control: snapshots taken and installed on the Raft thread")
    mode.add_argument("--compare", action="store_true", help="run both, background first")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--logs", type=Path, help="keep the nodes' logs in this directory")
    args = parser.parse_args(argv)
    modes = [False, True] if args.compare else [args.snapshots_on_tick_thread]
    reports = [run(args, on_tick_thread) for on_tick_thread in modes]
    text = json.dumps(reports, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
