"""Loading a cluster with many keys and sessions quickly, through the log.

A client writing one key per request does 1-2k writes/s here, so a million keys would take over
ten minutes. ``preload`` sends them as ``put_many`` commands (``kvstore.ops.put_many``: one log
entry of ``batch`` puts), each with a session, so every replica applies exactly the same puts and
a retried batch is not applied twice. Keys are written in a shuffled order (a real store's keys
do not arrive sorted, and a snapshot must sort them), values are random letters and digits (so
PySyncObj's zlib cannot shrink them to nothing).

Then it opens ``sessions`` sessions and makes one proposal in each, so the session store is full
of sessions with a cached result, as a busy cluster's is.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvstore import ops
from kvstore.client import Client
from kvstore.errors import OutcomeUnknown, Unavailable

KEY_FORMAT = b"preload/%08d"
DEFAULT_BATCH = 1000
"""Puts per log entry (about 120 KB at 100 B values): each replica applies an entry in one pass
of its tick loop, and 1,000 puts take it 10-20 ms."""
IN_FLIGHT = 4
"""Batches proposed at once (each with its own session): enough to keep the leader busy."""
_LETTERS = bytes(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"[i % 62]
                 for i in range(256))


@dataclass
class Preloaded:
    keys: int
    sessions: int
    seconds: float


def preload_key(n: int) -> bytes:
    return KEY_FORMAT % n


def batches(keys: int, batch: int, value_size: int, seed: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """The key/value pairs to load, in a shuffled order, ``batch`` at a time."""
    rng = random.Random(seed)
    order = list(range(keys))
    rng.shuffle(order)
    for start in range(0, keys, batch):
        chunk = order[start:start + batch]
        values = rng.randbytes(len(chunk) * value_size).translate(_LETTERS)
        yield [(preload_key(n), values[i * value_size:(i + 1) * value_size])
               for i, n in enumerate(chunk)]


def preload(client: Client, keys: int, *, sessions: int = 0, value_size: int = 100,
            batch: int = DEFAULT_BATCH, seed: int = 0, timeout: float = 60.0,
            progress: Callable[[int, int], None] | None = None) -> Preloaded:
    """Puts ``keys`` keys of ``value_size`` bytes and opens ``sessions`` sessions (each with one
    cached result); ``progress(keys_done, sessions_done)`` is called as it goes."""
    started = time.monotonic()
    done = [0, 0]
    lock = threading.Lock()

    def report(key_count: int, session_count: int) -> None:
        with lock:
            done[0] += key_count
            done[1] += session_count
            if progress is not None:
                progress(done[0], done[1])

    def load(pairs: list[tuple[bytes, bytes]]) -> None:
        session = _retrying(lambda: client.sync_get_session(timeout=timeout), timeout)
        _retrying(lambda: client.sync_propose(session, ops.put_many(pairs), timeout=timeout), timeout)
        session.proposal_completed()
        _retrying(lambda: client.sync_close_session(session, timeout=timeout), timeout)
        report(len(pairs), 0)

    def open_session(n: int) -> None:
        session = _retrying(lambda: client.sync_get_session(timeout=timeout), timeout)
        _retrying(lambda: client.sync_propose(session, ops.get(preload_key(n % max(keys, 1))),
                                              timeout=timeout), timeout)
        session.proposal_completed()
        report(0, 1)

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        pending: list[Future[None]] = []
        for pairs in batches(keys, batch, value_size, seed):
            if len(pending) >= IN_FLIGHT:  # a bounded number of batches in memory
                pending.pop(0).result()
            pending.append(pool.submit(load, pairs))
        for future in pending:
            future.result()
    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(open_session, n) for n in range(sessions)]:
            future.result()
    return Preloaded(keys, sessions, time.monotonic() - started)


def _retrying(call: Callable[[], object], timeout: float) -> object:
    """``call`` until it answers: ``Unavailable`` applied nothing, ``OutcomeUnknown`` is retried
    with the same session (the call does so itself until its deadline; this goes on past it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (Unavailable, OutcomeUnknown):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
