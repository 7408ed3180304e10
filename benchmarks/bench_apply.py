"""What exactly-once costs on the apply path, and what a snapshot of a full store costs.

Run: ``.venv/bin/python benchmarks/bench_apply.py`` (``make bench-apply``); ``--help`` lists the
sizes. Two measurements:

1. Entries per second through ``StateMachine.apply`` for session-managed proposals (a pool of
   registered sessions, each proposing, then completing so the next proposal carries the new
   ``responded_to``: the full rules 5-9 path, the command digest included) against no-op-session
   entries (rule 2: the same command, no session work), and session-managed proposals each
   sent twice, the copy answered from the cache (rule 8, which digests the copy's command to
   compare). All apply the same puts of 100 B values. Entries are encoded before the clock
   starts: this measures apply, not the client. A round is timed in CPU time of the thread
   (``time.thread_time``): on a shared machine, time the process spent waiting for a core is
   not counted. The kinds alternate, round after round and in alternating order, so drift of
   the machine (frequency scaling, caches shared with other load) hits all alike; the report is
   the median round of each and the ratios.
2. ``snapshot()`` time, ``restore()`` time and snapshot size for a store of 100k keys with 100 B
   values and 4096 sessions (dragonboat's default capacity), each holding one cached response.

``--baseline DIR`` instead compares the apply path of this tree's code with the code in DIR (a
checkout of another commit: ``git worktree add --detach /tmp/base main``). Each side runs in a
worker process of its own (``PYTHONPATH``), on the same entries; the rounds alternate between
the two, which side goes first alternating too, and the report is each side's median and the
median of the per-round ratios: what a change costs, measured side by side.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.internal import api_implementation

from kvstore import StateMachine, encode_entry, ops
from session import NOT_SESSION_MANAGED_CLIENT_ID, Session, new_noop_session, new_session

CLUSTER = 1


@dataclass
class Workload:
    """Pre-encoded entries for one round, and how to get a fresh state machine for it."""

    name: str
    setup: list[bytes]  # applied before the clock starts (registering the pool)
    entries: list[bytes]  # applied while timed
    capacity: int


def _key(i: int, keys: int) -> bytes:
    return b"key-%08d" % (i % keys)


def session_workload(entries: int, pool: int, value: bytes, keys: int) -> Workload:
    """``pool`` registered sessions take turns; each proposal is completed before the next."""
    rng = random.Random(1)
    sessions = [new_session(CLUSTER, rng=rng) for _ in range(pool)]
    setup = []
    for s in sessions:
        s.prepare_for_register()
        setup.append(encode_entry(s))
        s.prepare_for_propose()
    timed = []
    for i in range(entries):
        s = sessions[i % pool]
        timed.append(encode_entry(s, ops.put(_key(i, keys), value)))
        s.proposal_completed()  # the answer arrived: the next proposal acknowledges it
    return Workload("session-managed", setup, timed, capacity=max(pool, 1))


def retried_workload(entries: int, pool: int, value: bytes, keys: int) -> Workload:
    """As ``session_workload``, but every proposal is in the log twice in a row: the copy is a
    retry, answered from the cache. ``entries`` counts both copies."""
    first = session_workload(entries // 2, pool, value, keys)
    timed = [entry for entry in first.entries for _ in range(2)]
    return Workload("session-managed, each twice", first.setup, timed, first.capacity)


def noop_workload(entries: int, pool: int, value: bytes, keys: int) -> Workload:
    """The same puts from ``pool`` no-op sessions: applied every time, no dedup."""
    rng = random.Random(2)
    sessions = [new_noop_session(CLUSTER, rng=rng) for _ in range(pool)]
    timed = [
        encode_entry(sessions[i % pool], ops.put(_key(i, keys), value)) for i in range(entries)
    ]
    return Workload("no-op session", [], timed, capacity=max(pool, 1))


def time_round(workload: Workload) -> float:
    """CPU seconds to apply the workload's timed entries to a fresh, set-up state machine."""
    sm = StateMachine(CLUSTER, session_capacity=workload.capacity)
    for entry in workload.setup:
        sm.apply(entry)
    apply = sm.apply
    gc.collect()  # start every round with the same garbage: none
    start = time.thread_time()
    for entry in workload.entries:
        apply(entry)
    return time.thread_time() - start


def all_workloads(args: argparse.Namespace) -> list[Workload]:
    value = b"v" * args.value_size
    return [
        session_workload(args.entries, args.pool, value, args.keys),
        noop_workload(args.entries, args.pool, value, args.keys),
        retried_workload(args.entries, args.pool, value, args.keys),
    ]


def bench_apply(args: argparse.Namespace) -> list[tuple[str, str]]:
    workloads = all_workloads(args)
    seconds: dict[str, list[float]] = {w.name: [] for w in workloads}
    time_round(workloads[0])  # warm-up, not counted: imports, caches, allocator
    for r in range(args.rounds):
        for w in workloads if r % 2 == 0 else workloads[::-1]:
            seconds[w.name].append(time_round(w))
    count = {w.name: len(w.entries) for w in workloads}
    rate = {name: count[name] / statistics.median(s) for name, s in seconds.items()}
    spread = {name: (count[name] / max(s), count[name] / min(s)) for name, s in seconds.items()}
    session_rate, noop_rate = rate["session-managed"], rate["no-op session"]
    overhead_us = (1 / session_rate - 1 / noop_rate) * 1e6
    rows = [
        (f"apply, {args.value_size} B puts, {w.name}",
         f"{rate[w.name]:>10,.0f} entries/s   (rounds: {spread[w.name][0]:,.0f} .. "
         f"{spread[w.name][1]:,.0f})")
        for w in workloads
    ]
    rows.append(("ratio session / no-op", f"{session_rate / noop_rate:>10.2f}"))
    rows.append(("ratio each-twice / no-op",
                 f"{rate['session-managed, each twice'] / noop_rate:>10.2f}"))
    rows.append(("session cost per entry", f"{overhead_us:>10.2f} us"))
    return rows


def serve_rounds(args: argparse.Namespace) -> None:
    """Worker of ``--baseline`` (``--serve``): builds the workloads with the code on its
    ``PYTHONPATH``, then for each workload name read from stdin times one round and answers
    with the number of entries and the CPU seconds."""
    workloads = {w.name: w for w in all_workloads(args)}
    time_round(next(iter(workloads.values())))  # warm-up, not counted
    print("ready", flush=True)
    for line in sys.stdin:
        workload = workloads[line.strip()]
        print(len(workload.entries), time_round(workload), flush=True)


class Worker:
    """A ``--serve`` process running the code of one source tree."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        forwarded = ["--entries", str(args.entries), "--pool", str(args.pool), "--keys",
                     str(args.keys), "--value-size", str(args.value_size)]
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", *forwarded],
            env={**os.environ, "PYTHONPATH": str(root)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests, self.answers = self.process.stdin, self.process.stdout
        if self.answers.readline().strip() != "ready":
            raise RuntimeError(f"the worker for {root} did not start")

    def rate(self, workload: str) -> float:
        """Entries per CPU second of one round of ``workload``."""
        self.requests.write(workload + "\n")
        self.requests.flush()
        entries, seconds = self.answers.readline().split()
        return int(entries) / float(seconds)

    def close(self) -> None:
        self.requests.close()
        self.process.wait(timeout=60)


def bench_against(args: argparse.Namespace) -> list[tuple[str, str]]:
    """This tree's apply path against the one in ``args.baseline``, round by round."""
    names = [w.name for w in all_workloads(argparse.Namespace(**{**vars(args), "entries": 2}))]
    base = Worker(Path(args.baseline).resolve(), args)
    this = Worker(Path(__file__).resolve().parents[1], args)
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for name in names:
                for side, worker in [("base", base), ("this", this)][:: 1 if r % 2 else -1]:
                    rates.setdefault((side, name), []).append(worker.rate(name))
    finally:
        base.close()
        this.close()
    rows = []
    for name in names:
        ratios = sorted(t / b for b, t in zip(rates["base", name], rates["this", name]))
        rows.append((f"{name}: baseline / this tree",
                     f"{statistics.median(rates['base', name]):>10,.0f} / "
                     f"{statistics.median(rates['this', name]):,.0f} entries/s"))
        rows.append((f"{name}: this / baseline",
                     f"{statistics.median(ratios):>10.3f}   (median of the rounds' ratios; "
                     f"{ratios[0]:.3f} .. {ratios[-1]:.3f})"))
    return rows


def build_full_store(keys: int, sessions: int, value_size: int) -> StateMachine:
    """``keys`` keys of ``value_size`` bytes, and ``sessions`` sessions whose one proposal (a
    get of a key) left a cached response about ``value_size`` bytes long. Built through apply,
    so the state is exactly what a replica would hold."""
    sm = StateMachine(CLUSTER, session_capacity=sessions)
    system = Session(CLUSTER, NOT_SESSION_MANAGED_CLIENT_ID)
    value = b"v" * value_size
    for i in range(keys):
        sm.apply(encode_entry(system, ops.put(_key(i, keys), value)))
    rng = random.Random(3)
    for i in range(sessions):
        s = new_session(CLUSTER, rng=rng)
        s.prepare_for_register()
        sm.apply(encode_entry(s))
        s.prepare_for_propose()
        sm.apply(encode_entry(s, ops.get(_key(i, keys))))
    assert len(sm.sessions) == sessions and len(sm.data) == keys
    return sm


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_snapshot(args: argparse.Namespace) -> list[tuple[str, str]]:
    sm = build_full_store(args.snapshot_keys, args.snapshot_sessions, args.value_size)
    image = sm.snapshot()

    def restore() -> None:
        StateMachine(CLUSTER).restore(image)

    label = (f"{args.snapshot_keys:,} keys x {args.value_size} B, "
             f"{args.snapshot_sessions:,} sessions")
    return [
        (f"snapshot() [{label}]", f"{_median_seconds(sm.snapshot, args.repeats) * 1e3:>10.1f} ms"),
        ("restore()", f"{_median_seconds(restore, args.repeats) * 1e3:>10.1f} ms"),
        ("snapshot size", f"{len(image) / 2**20:>10.2f} MiB ({len(image):,} bytes)"),
    ]


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 48))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=50_000, help="entries per round and kind")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per kind (median reported)")
    parser.add_argument("--pool", type=int, default=64, help="sessions taking turns")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys the puts use")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    parser.add_argument("--snapshot-keys", type=int, default=100_000)
    parser.add_argument("--snapshot-sessions", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timings per snapshot measure")
    parser.add_argument("--baseline", metavar="DIR",
                        help="compare the apply path with the code in DIR instead (see above)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_rounds(args)
        return

    print(f"python {platform.python_version()} ({platform.machine()}), "
          f"protobuf backend {api_implementation.Type()}, "
          f"{args.rounds} rounds x {args.entries:,} entries per kind, pool of {args.pool} sessions")
    started = time.perf_counter()
    if args.baseline:
        print_table(f"apply path against {args.baseline} (CPU time, alternating rounds)",
                    bench_against(args))
        print(f"\ntotal {time.perf_counter() - started:.1f} s")
        return
    print_table("apply path (median of rounds, CPU time)", bench_apply(args))
    print_table(f"snapshot (median of {args.repeats})", bench_snapshot(args))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
