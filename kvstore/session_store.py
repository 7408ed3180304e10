"""The server side of sessions: a bounded store of client sessions in least-recently-used order.

Why LRU, and why it must be deterministic. A cluster cannot keep every session forever, so it
keeps ``capacity`` of them and evicts the one used least recently. Each replica evicts on its
own, without talking to the others, so each must pick the *same* victim: the order may change
only while applying committed entries, which every replica applies in the same sequence. No
read, clock or timer touches it. A snapshot records the order, and a restore rebuilds it
exactly, or a replica restored from a snapshot would later evict a different session than its
peers and answer a retry differently.

This module only keeps sessions; the rules for applying an entry against them live in
``kvstore.dedup``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ClientSession:
    """What the cluster remembers about one client: its acknowledged series and cached results."""

    client_id: int
    responded_to: int = 0
    responses: dict[int, bytes] = field(default_factory=dict)
    """Serialized results of applied proposals, by series id, all above ``responded_to``."""
    command_digests: dict[int, bytes] = field(default_factory=dict)
    """The digest of the command that produced each result in ``responses``, by series id
    (``kvstore.dedup.command_digest``). A result restored from a version-1 snapshot, taken
    before digests existed, has none."""

    def clear_to(self, responded_to: int) -> None:
        """Forgets results the client says it has received (series ids up to ``responded_to``).

        ``responded_to`` only moves forward: an entry that reaches the log late, carrying an
        older value, changes nothing.
        """
        if responded_to <= self.responded_to:
            return
        self.responded_to = responded_to
        for series_id in [s for s in self.responses if s <= responded_to]:
            del self.responses[series_id]
            self.command_digests.pop(series_id, None)

    def has_responded(self, series_id: int) -> bool:
        """Whether the client has acknowledged ``series_id`` (its result may be gone)."""
        return series_id <= self.responded_to

    def cached_response(self, series_id: int) -> bytes | None:
        return self.responses.get(series_id)

    def command_digest(self, series_id: int) -> bytes | None:
        """The digest of the command that produced the result cached for ``series_id``; None
        if no result is cached or the result predates digests."""
        return self.command_digests.get(series_id)

    def record(self, series_id: int, result: bytes, command_digest: bytes) -> None:
        self.responses[series_id] = result
        self.command_digests[series_id] = command_digest


@dataclass
class StoreCounts:
    """What the store has done since this replica started, for the node's metrics
    (``kvstore.metrics``): plain integers, so counting costs apply nothing measurable.

    Deterministic like the rest of the store (the same entries give the same counts), but not
    replicated state: snapshots and the digest leave them out, and a replica that restores a
    snapshot keeps counting from its own numbers (``StateMachine.restore``)."""

    evictions: int = 0
    """Sessions evicted to make room for a new one (least recently used first)."""
    cache_answers: int = 0
    """Proposals answered from a session's cache instead of being applied again: retries."""


class SessionStore:
    """At most ``capacity`` sessions, iterated least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"session capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._sessions: OrderedDict[int, ClientSession] = OrderedDict()
        self.counts = StoreCounts()

    def use(self, client_id: int) -> ClientSession | None:
        """Looks a session up for an entry being applied, marking it most recently used."""
        session = self._sessions.get(client_id)
        if session is not None:
            self._sessions.move_to_end(client_id)
        return session

    def peek(self, client_id: int) -> ClientSession | None:
        """Looks a session up without touching the LRU order (for reads and inspection)."""
        return self._sessions.get(client_id)

    def register(self, client_id: int) -> int | None:
        """Adds a session as most recently used; returns the client id it evicted, if any.

        Registering an id that is already present keeps its history and only marks it used,
        so a client that retries a register whose answer it lost does not wipe its own cache.
        """
        if self.use(client_id) is not None:
            return None
        evicted = None
        if len(self._sessions) >= self.capacity:
            evicted, _ = self._sessions.popitem(last=False)
            self.counts.evictions += 1
        self._sessions[client_id] = ClientSession(client_id)
        return evicted

    def unregister(self, client_id: int) -> bool:
        """Removes a session; returns whether it was there."""
        return self._sessions.pop(client_id, None) is not None

    def restore(self, sessions: list[ClientSession]) -> None:
        """Replaces the content with ``sessions``, given least recently used first."""
        if len(sessions) > self.capacity:
            raise ValueError(f"{len(sessions)} sessions exceed the capacity {self.capacity}")
        restored = OrderedDict((s.client_id, s) for s in sessions)
        if len(restored) != len(sessions):
            raise ValueError("duplicate client id in the sessions to restore")
        self._sessions = restored

    def __iter__(self) -> Iterator[ClientSession]:
        return iter(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._sessions
