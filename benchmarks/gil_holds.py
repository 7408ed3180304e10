"""How long does a tick thread wait for the interpreter while a snapshot job runs? (issue 9)

Run: ``flock /tmp/kv-heavy.lock .venv/bin/python benchmarks/gil_holds.py`` (1M keys of 100 B
and 4,096 sessions; ``--keys``). A stand-in for the Raft tick thread sleeps 1 ms in a loop and
measures how late it gets the interpreter back, while a job thread does what a node's snapshot
jobs do, with the node's own code: freeze the state, encode it into a dump file
(``dump_file.Writer``, as ``Snapshotter._write``), then read it back and decode it (as
``Snapshotter._restore``), with the switch interval the snapshotter sets. ``--policy`` is how
the job's thread is scheduled: ``batch`` (what the snapshotter does), ``normal``, or ``nice10``
(what it did); ``--hogs N`` adds N busy processes, a machine whose cores are all wanted (the
3-node benchmark's three nodes and 16 writers on two cores). At each pass the stand-in also
overwrites a random key, as applies do (so later writes copy the frozen shards, as in a node).
Each time the stand-in is late by
more than 5 ms, it records where the job's thread is then (the line after the call that held
the lock), and every garbage collection is timed (by generation and thread): the report gives
the worst lateness, how many were over 5 ms, and the longest few of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvstore import snapshot  # noqa: E402
from kvstore.data import Data  # noqa: E402
from kvstore.dedup import COMMAND_DIGEST_SIZE  # noqa: E402
from kvstore.node import dump_file, snapshotter  # noqa: E402
from kvstore.session_store import ClientSession, SessionStore  # noqa: E402

LATE = 0.005
NAP = 0.001


def state_of(keys: int, sessions: int) -> snapshot.State:
    """Keys as ``kv bench --preload`` writes them, in random order, values of random letters."""
    rng = random.Random(1)
    order = list(range(keys))
    rng.shuffle(order)
    data = Data()
    for n in order:
        data[b"preload/%08d" % n] = bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=100))
    store = SessionStore(sessions)
    store.restore([ClientSession(i + 1, 1, {2: b"r" * 100}, {2: b"d" * COMMAND_DIGEST_SIZE})
                   for i in range(sessions)])
    return snapshot.State(1, store, data)


def schedule(policy: str) -> None:
    me = threading.get_native_id()
    if policy == "batch":
        os.sched_setscheduler(me, os.SCHED_BATCH, os.sched_param(0))
    elif policy == "nice10":
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + 10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=4096)
    parser.add_argument("--policy", choices=("batch", "normal", "nice10"), default="batch")
    parser.add_argument("--hogs", type=int, default=0)
    args = parser.parse_args(argv)
    state = state_of(args.keys, args.sessions)
    collections: list[tuple[float, int, str]] = []
    started = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append((time.perf_counter() - started[0], info["generation"],
                                threading.current_thread().name))
    gc.callbacks.append(on_collection)
    job_ident: list[int] = []
    lates: list[tuple[float, str]] = []
    done = threading.Event()
    phases: dict[str, float] = {}

    rng = random.Random(2)  # (no list of the keys: the collector would visit it)
    restored: list[Any] = []

    def tick() -> None:
        while not done.is_set():
            state.data[b"preload/%08d" % rng.randrange(args.keys)] = b"w" * 100
            t = time.perf_counter()
            time.sleep(NAP)
            late = time.perf_counter() - t - NAP
            if late > LATE and job_ident:
                frame = sys._current_frames().get(job_ident[0])
                stack = reversed(traceback.extract_stack(frame, limit=3)) if frame else []
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stack)
                lates.append((late, where))

    def job() -> None:
        job_ident.append(threading.get_ident())
        schedule(args.policy)
        with snapshotter.SWITCHING, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            path = os.path.join(tmp, "raft.dump")
            t0 = time.perf_counter()
            frozen = snapshot.freeze(state)
            writer = dump_file.Writer(path)
            for piece in snapshot.encode_pieces(frozen):
                if piece:
                    writer.write(piece)
            writer.finish({})
            release = getattr(frozen.data, "release", None)  # (builds before it: all at once)
            for _ in release() if release is not None else ():
                pass
            del frozen
            phases["write_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            steps = snapshot.decode_steps(dump_file.read(path).snapshot)
            while True:
                try:
                    next(steps)
                except StopIteration as decoded:
                    restored.append(decoded.value)  # a node keeps it: freed after the run
                    break
            phases["restore_s"] = time.perf_counter() - t0

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        threads = [threading.Thread(target=tick, name="tick"),
                   threading.Thread(target=job, name="job")]
        for t in threads:
            t.start()
        threads[1].join()
        done.set()
        threads[0].join()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    lates.sort(reverse=True)
    collections.sort(reverse=True)
    report: dict[str, Any] = {
        "keys": args.keys, "policy": args.policy, "hogs": args.hogs,
        **{k: round(v, 2) for k, v in phases.items()},
        "worst_late_ms": round(lates[0][0] * 1e3, 1) if lates else 0.0,
        "lates_over_5ms": len(lates), "late_ms_total": round(sum(l for l, _ in lates) * 1e3),
        "worst_lates": [f"{l * 1e3:.1f} ms at {w}" for l, w in lates[:6]],
        "longest_collections": [f"{s * 1e3:.1f} ms gen {g} on {n}" for s, g, n in collections[:4]],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
