"""Two ways to take snapshots off the Raft thread, measured side by side (issue 9, item 4).

Run: ``flock /tmp/kv-heavy.lock .venv/bin/python benchmarks/snapshot_designs.py`` (1M keys of
100 B; ``--keys``). Design B needs ``pip install lmdb`` (not a dependency of the project: the
measurements are why). Each design runs in a fresh process of its own, so its peak RSS is its own.

* **A, copy-on-write in memory** (what the node does, ``kvstore.node.snapshotter``): the data
  stays a dict; a snapshot freezes it (``dict.copy`` on the Raft thread) and a background thread
  sorts and encodes the copy in pieces (``kvstore.snapshot.encode_pieces``); an install decodes
  in pieces (``decode_steps``) and swaps the dict in.
* **B, an embedded engine with consistent read snapshots** (LMDB, the nearest Python binding to
  etcd's bbolt): the data lives in LMDB; each applied batch is a write transaction that also
  stores the applied index (so a restart does not apply an entry twice); a snapshot is a read
  transaction (free: MVCC), read in key order by a cursor in the background; an install writes
  the records into a fresh environment (in key order, ``append=True``) and swaps environments.

For each: the store's cost of a put on the apply path (``put_us``; for scale, ``whole_apply_us``
is a whole session-less put through ``StateMachine.apply``, decoding and dedup included), the time the Raft thread is held to start a
snapshot, the background time to encode it, the longest single hold of the interpreter by the
background work between two pauses (what a tick thread waits at worst), the time to install
one, and the process's peak RSS. Both encode the same bytes (checked).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvstore import StateMachine, encode_entry, ops, snapshot  # noqa: E402
from kvstore.data import FrozenData  # noqa: E402
from session import new_noop_session  # noqa: E402

BATCH = 16
"""Entries per applied batch (group commit under load)."""


def dataset(keys: int, seed: int = 1) -> Iterator[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    order = list(range(keys))
    rng.shuffle(order)
    for n in order:
        yield b"preload/%08d" % n, rng.randbytes(50).hex().encode()


def timed_pieces(pieces: Iterator[Any]) -> tuple[float, float, list[Any]]:
    """Total seconds and the longest gap between two pieces (one uninterrupted hold)."""
    out, worst = [], 0.0
    start = last = time.perf_counter()
    for piece in pieces:
        now = time.perf_counter()
        worst = max(worst, now - last)
        out.append(piece)
        last = time.perf_counter()
    return time.perf_counter() - start, worst, out


def design_a(keys: int) -> dict[str, Any]:
    sm = StateMachine(1, session_capacity=4096)
    sm.data = dict(dataset(keys))
    session = new_noop_session(1)
    entries = [encode_entry(session, ops.put(b"preload/%08d" % (i % keys), b"x" * 100))
               for i in range(50_000)]
    start = time.perf_counter()
    for entry in entries:
        sm.apply(entry)
    apply_us = (time.perf_counter() - start) / len(entries) * 1e6
    data, n = sm.data, 50_000
    start = time.perf_counter()
    for b in range(0, n, BATCH):  # the store's part of a put alone, as measured for B
        for i in range(b, min(b + BATCH, n)):
            data[b"preload/%08d" % (i % keys)] = b"x" * 100
    put_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    frozen = sm.freeze()
    freeze = time.perf_counter() - start
    encode_s, encode_hold, pieces = timed_pieces(snapshot.encode_pieces(frozen))
    image = b"".join(pieces)
    del pieces, frozen
    steps = snapshot.decode_steps(image)
    start = last = time.perf_counter()
    hold = 0.0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            state = done.value
            break
        now = time.perf_counter()
        hold = max(hold, now - last)
        last = now
    restore = time.perf_counter() - start
    assert state.data == sm.data
    return {"design": "A: dict, frozen copy, pieces", "put_us": round(put_us, 2),
            "whole_apply_us": round(apply_us, 2),
            "raft_thread_hold_to_start_ms": round(freeze * 1e3, 1),
            "encode_s": round(encode_s, 2), "encode_longest_hold_ms": round(encode_hold * 1e3, 1),
            "install_s": round(restore, 2), "install_longest_hold_ms": round(hold * 1e3, 1),
            "snapshot_mib": round(len(image) / 2**20, 1), "digest": sm.digest(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def design_b(keys: int) -> dict[str, Any]:
    import lmdb

    root = Path(tempfile.mkdtemp(prefix="h9s-lmdb-", dir="/tmp"))
    try:
        env = lmdb.open(str(root / "a"), map_size=8 << 30, sync=False, metasync=False,
                        writemap=True)
        with env.begin(write=True) as txn:
            for k, v in dataset(keys):
                txn.put(k, v)
        # the apply path: a write transaction per batch, the applied index stored with the data
        index = 0
        start = time.perf_counter()
        n = 50_000
        for b in range(0, n, BATCH):
            with env.begin(write=True) as txn:
                for i in range(b, min(b + BATCH, n)):
                    txn.put(b"preload/%08d" % (i % keys), b"x" * 100)
                index += 1
                txn.put(b"\x00applied", index.to_bytes(8, "big"))
        put_us = (time.perf_counter() - start) / n * 1e6
        with env.begin(write=True) as txn:
            txn.delete(b"\x00applied")
        start = time.perf_counter()
        reader = env.begin()  # the snapshot: a read transaction
        freeze = time.perf_counter() - start
        header = b"".join(snapshot.encode_pieces(
            snapshot.Frozen(1, 4096, (), FrozenData.copy_of({}))))

        def pieces() -> Iterator[bytes]:
            yield header
            out = bytearray()
            count = 0
            for k, v in reader.cursor():  # already in key order: no sort
                snapshot._put_record(out, k, v)
                count += 1
                if count == snapshot.PIECE_ENTRIES:
                    yield bytes(out)
                    out.clear()
                    count = 0
            yield bytes(out)
        encode_s, encode_hold, parts = timed_pieces(pieces())
        image = b"".join(parts)
        del parts
        reader.abort()
        # the install: records into a fresh environment, in key order, in pieces
        state_steps = snapshot.decode_steps(image)
        fresh = lmdb.open(str(root / "b"), map_size=8 << 30, sync=False, metasync=False,
                          writemap=True)
        start = last = time.perf_counter()
        hold = 0.0
        while True:
            try:
                next(state_steps)
            except StopIteration as done:
                decoded = done.value.data
                break
            now = time.perf_counter()
            hold = max(hold, now - last)
            last = now
        decode_s = time.perf_counter() - start
        load_start = last = time.perf_counter()
        items = iter(decoded.items())
        while True:
            with fresh.begin(write=True) as txn:
                wrote = 0
                for k, v in items:
                    txn.put(k, v, append=True)
                    wrote += 1
                    if wrote == snapshot.PIECE_ENTRIES:
                        break
            now = time.perf_counter()
            hold = max(hold, now - last)
            last = now
            if wrote < snapshot.PIECE_ENTRIES:
                break
        install = decode_s + time.perf_counter() - load_start
        start = time.perf_counter()
        (root / "copy").mkdir()
        env.copy(str(root / "copy"), compact=True)
        copy_s = time.perf_counter() - start
        import hashlib
        digest = hashlib.sha256(image).hexdigest()[:16]
        return {"design": "B: LMDB, read txn, cursor", "put_us": round(put_us, 2),
                "raft_thread_hold_to_start_ms": round(freeze * 1e3, 3),
                "encode_s": round(encode_s, 2),
                "encode_longest_hold_ms": round(encode_hold * 1e3, 1),
                "install_s": round(install, 2), "install_longest_hold_ms": round(hold * 1e3, 1),
                "env_copy_s": round(copy_s, 2),
                "snapshot_mib": round(len(image) / 2**20, 1), "digest": digest,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _child(name: str, keys: int, out: Any) -> None:
    out.send(globals()[name](keys))


def in_own_process(name: str, keys: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, keys, send))
    proc.start()
    while not receive.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"{name} failed (its process exited with {proc.exitcode})")
    result = receive.recv()
    proc.join()
    return result  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    results = [in_own_process("design_a", args.keys)]
    try:
        import lmdb  # noqa: F401
        results.append(in_own_process("design_b", args.keys))
    except ImportError:
        print("lmdb is not installed (pip install lmdb): design B not measured", file=sys.stderr)
    # Both images hold the same data (dataset(), then the same puts) and no sessions.
    print(json.dumps(results, indent=2))
    if len(results) == 2 and results[0]["digest"] != results[1]["digest"]:
        print("NOTE: the digests differ", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
