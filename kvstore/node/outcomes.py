"""What became of a proposal: applied, certainly not applied, or unknown.

PySyncObj reports a failed call with a ``FAIL_REASON``. For exactly-once the only question is
whether the entry may still take effect, because that decides whether a retry without a session
is safe. This module sorts the reasons into the two answers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON

REASON_NAMES: dict[int, str] = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}

# QUEUE_FULL and MISSING_LEADER fail before the entry reaches any log; NOT_LEADER is a leader
# refusing a forwarded command before appending it; REQUEST_DENIED is a refused membership or
# version change; DISCARDED means the index we were given now holds another term's entry: ours
# was overwritten, and PySyncObj never proposes it again.
DEFINITELY_NOT_APPLIED = frozenset({
    FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
    FAIL_REASON.NOT_LEADER, FAIL_REASON.REQUEST_DENIED,
})
# LEADER_CHANGED: a follower lost the leader after forwarding (the old leader may have appended
# it); UNKNOWN_OUTCOME: the index was applied before we learnt of it (e.g. by a snapshot).
OUTCOME_UNKNOWN = frozenset({FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME})


class ProposeError(Exception):
    """Base class; ``reason`` is the FAIL_REASON name, or ``TIMEOUT`` / ``NODE_FAILED``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class NotApplied(ProposeError):
    """The entry was not applied and never will be: a retry is safe anywhere."""


class OutcomeUnknown(ProposeError):
    """The entry may be applied, now or later: only a session makes a retry safe."""


Waiter = Callable[[Any, int], None]
"""Told what became of one proposal, on the tick thread: ``(result, fail_reason)``. It must only
store and signal, and never raise: it runs inside PySyncObj's apply loop."""


def outcome(result: Any, error: int) -> bytes:
    """The result bytes, or the exception that says what became of the entry."""
    if error == FAIL_REASON.SUCCESS:
        return result  # type: ignore[no-any-return]
    name = REASON_NAMES.get(error, str(error))
    if error in DEFINITELY_NOT_APPLIED:
        raise NotApplied(name)
    raise OutcomeUnknown(name)


class Pending:
    """A waiter for a blocked thread: it signals an event."""

    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Any = None
        self.error: int = FAIL_REASON.SUCCESS

    def __call__(self, result: Any, error: int) -> None:  # PySyncObj's callback(result, failReason)
        self.result = result
        self.error = error
        self.event.set()

    def outcome(self) -> bytes:
        return outcome(self.result, self.error)


class LoopWaiter:
    """A waiter for an asyncio task: it settles a future on the task's event loop.

    ``BatchCallback`` settles all the loop waiters of a batch with one wake-up of their loop
    (``settle_on_loop``); called alone, a waiter wakes its loop itself.
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[tuple[Any, int]] = loop.create_future()

    def __call__(self, result: Any, error: int) -> None:
        settle_on_loop(self.loop, [(self, result, error)])

    def settle(self, result: Any, error: int) -> None:
        """On the loop's thread."""
        if not self.future.done():  # not given up on (a timeout cancels it)
            self.future.set_result((result, error))


def settle_on_loop(loop: asyncio.AbstractEventLoop,
                   outcomes: list[tuple[LoopWaiter, Any, int]]) -> None:
    def settle_all() -> None:
        for waiter, result, error in outcomes:
            waiter.settle(result, error)
    try:
        loop.call_soon_threadsafe(settle_all)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


class BatchCallback:
    """The callback of one replicated batch: hands each proposer its own entry's result."""

    __slots__ = ("waiters",)

    def __init__(self, waiters: list[Waiter]) -> None:
        self.waiters = waiters

    def __call__(self, results: Any, error: int) -> None:
        if error != FAIL_REASON.SUCCESS:
            told = [(waiter, None, error) for waiter in self.waiters]
        elif not isinstance(results, list) or len(results) != len(self.waiters):
            # A batch that did not decode on apply: nothing was applied, but say "unknown"
            # rather than guess (our node never sends such a batch).
            told = [(waiter, None, FAIL_REASON.UNKNOWN_OUTCOME) for waiter in self.waiters]
        else:
            told = [(waiter, result, FAIL_REASON.SUCCESS)
                    for waiter, result in zip(self.waiters, results, strict=True)]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[LoopWaiter, Any, int]]] = {}
        for waiter, result, reason in told:
            if isinstance(waiter, LoopWaiter):
                by_loop.setdefault(waiter.loop, []).append((waiter, result, reason))
            else:
                waiter(result, reason)
        for loop, outcomes in by_loop.items():
            settle_on_loop(loop, outcomes)
