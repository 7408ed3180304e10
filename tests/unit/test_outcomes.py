"""How a replicated batch's fate reaches each proposer (``kvstore.node.outcomes``).

The tick thread calls one ``BatchCallback`` per batch; blocked threads (``Pending``) and asyncio
tasks (``LoopWaiter``) each get their own entry's result, and a loop is woken once per batch.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pysyncobj import FAIL_REASON

from kvstore.node.outcomes import (
    BatchCallback,
    LoopWaiter,
    NotApplied,
    OutcomeUnknown,
    Pending,
    outcome,
)


THREAD_DEADLINE = 5.0
AWAIT_DEADLINE = 5.0


def on_another_thread(call: Any, *args: Any) -> None:
    """Runs ``call(*args)`` on a thread that stands for the tick thread, and raises here what
    it raised there (a thread's exception would otherwise only be a warning)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call(*args)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(THREAD_DEADLINE)
    assert not thread.is_alive(), f"the call did not return within {THREAD_DEADLINE} s"
    if raised:
        raise raised[0]


async def settled(waiter: LoopWaiter) -> tuple[Any, int]:
    """The waiter's outcome, or a failure if it is not settled in time (never a hang)."""
    return await asyncio.wait_for(asyncio.shield(waiter.future), AWAIT_DEADLINE)


def test_outcome_sorts_fail_reasons_into_not_applied_and_unknown() -> None:
    assert outcome(b"result", FAIL_REASON.SUCCESS) == b"result"
    for reason in (FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
                   FAIL_REASON.NOT_LEADER, FAIL_REASON.REQUEST_DENIED):
        with pytest.raises(NotApplied):
            outcome(None, reason)
    for reason in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
        with pytest.raises(OutcomeUnknown):
            outcome(None, reason)


def test_each_waiter_of_a_batch_gets_its_own_result_threads_and_tasks_alike() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first, third = LoopWaiter(loop), LoopWaiter(loop)
        second = Pending()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        on_another_thread(BatchCallback([first, second, third]), [b"r1", b"r2", b"r3"],
                          FAIL_REASON.SUCCESS)
        assert await settled(first) == (b"r1", FAIL_REASON.SUCCESS)
        assert await settled(third) == (b"r3", FAIL_REASON.SUCCESS)
        assert second.event.is_set() and second.outcome() == b"r2"
        assert wakeups == 1, "one wake-up of the loop per batch"

    asyncio.run(scenario())


def test_a_failed_batch_fails_every_waiter_with_its_reason() -> None:
    async def scenario() -> None:
        waiter, pending = LoopWaiter(asyncio.get_running_loop()), Pending()
        on_another_thread(BatchCallback([waiter, pending]), None, FAIL_REASON.LEADER_CHANGED)
        assert await settled(waiter) == (None, FAIL_REASON.LEADER_CHANGED)
        with pytest.raises(OutcomeUnknown):
            pending.outcome()

    asyncio.run(scenario())


def test_results_that_do_not_match_the_batch_are_an_unknown_outcome_for_all() -> None:
    pending = [Pending(), Pending()]
    BatchCallback(list(pending))([b"only one"], FAIL_REASON.SUCCESS)
    for p in pending:
        with pytest.raises(OutcomeUnknown):
            p.outcome()


def test_a_waiter_whose_task_gave_up_or_whose_loop_is_gone_is_skipped_without_raising() -> None:
    """The callback runs inside PySyncObj's apply loop: raising there would re-apply the entry.
    A waiter whose task gave up (its future cancelled by a timeout) stays cancelled, and the
    other waiters of the batch still get their results; a waiter whose loop has closed is
    skipped. Either way the callback returns normally on the tick thread."""
    async def give_up() -> tuple[LoopWaiter, LoopWaiter, Pending]:
        loop = asyncio.get_running_loop()
        gone, alive, blocked = LoopWaiter(loop), LoopWaiter(loop), Pending()
        gone.future.cancel()
        on_another_thread(BatchCallback([gone, alive, blocked]), [b"late", b"r2", b"r3"],
                          FAIL_REASON.SUCCESS)
        assert await settled(alive) == (b"r2", FAIL_REASON.SUCCESS)
        assert gone.future.cancelled()
        assert blocked.outcome() == b"r3"
        return gone, alive, blocked

    gone, _, _ = asyncio.run(give_up())
    assert gone.loop.is_closed()
    after_close = Pending()
    on_another_thread(BatchCallback([gone, after_close]), [b"later", b"still"], FAIL_REASON.SUCCESS)
    assert after_close.outcome() == b"still"
    on_another_thread(gone, b"alone", FAIL_REASON.SUCCESS)  # a waiter called by itself too
