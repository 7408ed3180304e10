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


def on_another_thread(call: Any, *args: Any) -> None:
    """Stands for the tick thread."""
    thread = threading.Thread(target=call, args=args)
    thread.start()
    thread.join(5)


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
        assert await first.future == (b"r1", FAIL_REASON.SUCCESS)
        assert await third.future == (b"r3", FAIL_REASON.SUCCESS)
        assert second.event.is_set() and second.outcome() == b"r2"
        assert wakeups == 1, "one wake-up of the loop per batch"

    asyncio.run(scenario())


def test_a_failed_batch_fails_every_waiter_with_its_reason() -> None:
    async def scenario() -> None:
        waiter, pending = LoopWaiter(asyncio.get_running_loop()), Pending()
        on_another_thread(BatchCallback([waiter, pending]), None, FAIL_REASON.LEADER_CHANGED)
        assert await waiter.future == (None, FAIL_REASON.LEADER_CHANGED)
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
    """The callback runs inside PySyncObj's apply loop: raising there would re-apply the entry."""
    async def give_up() -> LoopWaiter:
        waiter = LoopWaiter(asyncio.get_running_loop())
        waiter.future.cancel()
        on_another_thread(BatchCallback([waiter]), [b"late"], FAIL_REASON.SUCCESS)
        await asyncio.sleep(0)  # the settle callback runs on a cancelled future: ignored
        return waiter

    waiter = asyncio.run(give_up())  # the loop is closed now
    BatchCallback([waiter])([b"later still"], FAIL_REASON.SUCCESS)
