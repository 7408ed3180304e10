"""Closed-loop load on a real local cluster: throughput and latency of writes through the API.

Starts a fresh 3-node cluster (``kv cluster up --detach``) in a temporary directory unless
``--endpoints`` is given, runs each configuration for ``--seconds``, alternating configurations
round by round so machine drift hits all of them alike, and prints medians.

    .venv/bin/python benchmarks/bench_cluster.py --clients 1,16 --rounds 3 --seconds 5

Clients run in ``--procs`` worker processes (threads inside each) so the Python client side is
not one GIL. Each client has its own session (or no-op session) and increments its own key.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvstore import errors, ops
from kvstore.client import Client


def worker(endpoints: list[str], threads: int, seconds: float, sessions: bool, value_size: int,
           out: mp.Queue) -> None:  # type: ignore[type-arg]
    client = Client(endpoints, timeout=10)
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    start_at = time.monotonic() + 0.5

    def run(index: int) -> None:
        nonlocal failures
        session = client.sync_get_session() if sessions else client.get_noop_session()
        key = f"bench/{os.getpid()}/{index}".encode()
        value = b"x" * value_size
        mine: list[float] = []
        while time.monotonic() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while (now := time.monotonic()) < end:
            try:
                client.sync_propose(session, ops.put(key, value), timeout=5)
            except errors.KVError:
                with lock:
                    failures += 1
                continue
            mine.append(time.monotonic() - now)
            if sessions:
                session.proposal_completed()
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((latencies, failures))
    client.close()


def measure(endpoints: list[str], clients: int, procs: int, seconds: float, sessions: bool,
            value_size: int) -> dict[str, float]:
    procs = min(procs, clients)
    per_proc = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    workers = [mp.Process(target=worker, args=(endpoints, n, seconds, sessions, value_size, queue))
               for n in per_proc]
    for w in workers:
        w.start()
    latencies: list[float] = []
    failures = 0
    for _ in workers:
        lat, fail = queue.get(timeout=seconds + 60)
        latencies += lat
        failures += fail
    for w in workers:
        w.join()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(int(p * len(latencies)), len(latencies) - 1)] * 1000 if latencies else 0.0

    return {"ops_s": len(latencies) / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "errors": failures}


def start_cluster(directory: Path, nodes: int) -> list[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KV_")},
           "KV_CLUSTER_DIR": str(directory)}
    subprocess.run([sys.executable, "-m", "cli", "cluster", "up", "--detach", "--nodes", str(nodes)],
                   env=env, check=True, capture_output=True)
    spec = json.loads((directory / "cluster.json").read_text())
    return [node["api"] for node in spec["nodes"]]


def stop_cluster(directory: Path) -> None:
    env = {**os.environ, "KV_CLUSTER_DIR": str(directory)}
    subprocess.run([sys.executable, "-m", "cli", "cluster", "down"], env=env, check=False,
                   capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", help="comma list; default: a fresh local cluster")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", default="1,16", help="comma list of client counts")
    parser.add_argument("--procs", type=int, default=4, help="client worker processes")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--modes", default="sessions,noop", help="sessions and/or noop")
    args = parser.parse_args()

    tmp = None
    if args.endpoints:
        endpoints = args.endpoints.split(",")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="kv-bench-")) / "cluster"
        endpoints = start_cluster(tmp, args.nodes)
    try:
        configs = [(c, m) for c in map(int, args.clients.split(",")) for m in args.modes.split(",")]
        runs: dict[tuple[int, str], list[dict[str, float]]] = {k: [] for k in configs}
        for round_no in range(args.rounds):
            order = configs if round_no % 2 == 0 else list(reversed(configs))
            for clients, mode in order:
                result = measure(endpoints, clients, args.procs, args.seconds, mode == "sessions",
                                 args.value_size)
                runs[(clients, mode)].append(result)
                print(f"round {round_no + 1}: {clients:>3} clients {mode:>8}: "
                      f"{result['ops_s']:8.0f} ops/s  p50 {result['p50_ms']:6.2f} ms  "
                      f"p99 {result['p99_ms']:6.2f} ms  errors {result['errors']}", flush=True)
        print(f"\nmedians of {args.rounds} rounds x {args.seconds:.0f} s, {args.nodes} nodes, "
              f"{args.value_size} B values, puts")
        print(f"{'clients':>7} {'mode':>8} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
        for clients, mode in configs:
            rs = runs[(clients, mode)]
            print(f"{clients:>7} {mode:>8} {statistics.median(r['ops_s'] for r in rs):8.0f} "
                  f"{statistics.median(r['p50_ms'] for r in rs):7.2f} "
                  f"{statistics.median(r['p99_ms'] for r in rs):7.2f}")
        for clients in map(int, args.clients.split(",")):
            if (clients, "sessions") in runs and (clients, "noop") in runs:
                ratios = [s["ops_s"] / n["ops_s"] for s, n in
                          zip(runs[(clients, "sessions")], runs[(clients, "noop")]) if n["ops_s"]]
                print(f"sessions / noop throughput at {clients} clients: "
                      f"{statistics.median(ratios):.2f} (per round: "
                      f"{', '.join(f'{r:.2f}' for r in ratios)})")
    finally:
        if tmp is not None:
            stop_cluster(tmp)


if __name__ == "__main__":
    main()
