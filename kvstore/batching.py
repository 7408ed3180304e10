"""How the client library forms batches of proposals: group commit on the client side.

Every gRPC call (or stream message, ``kvstore.streams``) costs a few hundred microseconds of
Python on each side, whatever it carries, so concurrent proposals to one node travel together:
one ``ProposeStream`` message or one ``ProposeBatch`` call per batch ("a call" below). The rule
is the one of group commit, with no timer:

* A proposal that finds fewer than ``max_in_flight`` calls in flight to its endpoint goes out
  at once, alone (a lone proposal never waits).
* Otherwise it queues; when a call ends, the queue goes out as the next batch (or batches: at
  most ``max_items`` proposals and about ``max_bytes`` each, a proposal bigger than that alone).
  So the linger is bounded by one call in flight, and it only happens when there is load.
* A queued proposal whose caller stops waiting (its attempt's deadline passed, its task was
  cancelled) is withdrawn: it was never sent, so it is certainly not applied.

``GroupCommit`` is that bookkeeping and nothing else (no I/O, no clock, no lock): the sync
client calls it under its lock, the asyncio client from its event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_IN_FLIGHT = 1
"""Calls in flight per endpoint before proposals queue: one. A proposal arriving during a call
then waits for that call's round trip before it leaves, but every proposal that arrived
meanwhile leaves with it. Four closed-loop threads sharing a client (the bench's 16 clients
in four processes) then make calls of two proposals on average, where with two in flight their
calls cycle through three batches that add up to four (4/3 each): two thirds of the calls. On
these machines (three nodes and their clients on two cores) every call costs a few hundred
microseconds of CPU on each side, and that CPU, not the wait, bounds throughput:
``kv bench --clients 1,16,64``, alternating the two settings, gave at 16 clients 1.09 and 1.29
times the ops/s of two in flight, with 0.8 times the node and the client CPU per write, and at
64 clients 1.01 and 1.24 (README, Performance)."""
MAX_ITEMS = 256
MAX_BYTES = 1024 * 1024
"""Limits of one batch; under the server's 2 MiB message limit with room for a lone 1 MiB
value."""


class GroupCommit(Generic[T]):
    """The batches of one endpoint: what is in flight, what waits."""

    def __init__(self, size: Callable[[T], int], *, max_in_flight: int = MAX_IN_FLIGHT,
                 max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES) -> None:
        if max_in_flight < 1 or max_items < 1:
            raise ValueError("max_in_flight and max_items must be at least 1")
        self._size = size
        self.max_in_flight = max_in_flight
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.calls = 0
        self.sent = 0
        """Calls started and proposals they carried (``sent / calls``: the mean batch)."""
        self._queue: deque[T] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def add(self, item: T) -> list[T] | None:
        """A new proposal: ``[item]`` if it goes out now (the caller sends it, then calls
        ``finished``), ``None`` if it waits for a call to end."""
        if self.in_flight < self.max_in_flight:
            # Nothing waits when a call slot is free (the invariant), so nothing to join.
            self.in_flight += 1
            self.calls += 1
            self.sent += 1
            return [item]
        self._queue.append(item)
        return None

    def finished(self) -> list[list[T]]:
        """A call ended: the batches to send now (each to be ``finished`` in its turn)."""
        self.in_flight -= 1
        if self.in_flight < 0:
            raise RuntimeError("finished() without a call in flight")
        batches = []
        while self._queue and self.in_flight < self.max_in_flight:
            batch = self._take()
            batches.append(batch)
            self.in_flight += 1
            self.calls += 1
            self.sent += len(batch)
        return batches

    def withdraw(self, item: T) -> bool:
        """Takes a queued ``item`` back; False if it already left in a batch."""
        try:
            self._queue.remove(item)
        except ValueError:
            return False
        return True

    def _take(self) -> list[T]:
        batch = [self._queue.popleft()]
        size = self._size(batch[0])
        while self._queue and len(batch) < self.max_items:
            more = self._size(self._queue[0])
            if size + more > self.max_bytes:
                break
            batch.append(self._queue.popleft())
            size += more
        return batch
