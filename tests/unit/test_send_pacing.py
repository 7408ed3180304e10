"""``kvstore.node.send_pacing`` (defect D15): a leader's send step spends at most
``SEND_BUDGET`` per pass on followers that are behind, and every follower still gets its first
message of each pass. Unit tests of the rule, then PySyncObj's own send step on a real node."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from kvstore.node import send_pacing
from kvstore.node.send_pacing import SendPacer
from tests.unit.raft_harness import NO_OP, harnesses, next_node_idx, wait_for

BUDGET = 2**-7
"""Exact in binary, as are the clock's sums."""


def entries(first: int, last: int) -> dict[str, Any]:
    return {"type": "append_entries", "entries": [(NO_OP, i, 1) for i in range(first, last + 1)]}


@pytest.fixture(autouse=True)
def exact_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(send_pacing, "SEND_BUDGET", BUDGET)


def test_past_the_budget_a_follower_behind_is_parked_and_put_back_when_the_step_ends() -> None:
    log = [(NO_OP, i, 1) for i in range(1, 101)]
    next_index = {"a": 11}
    clock = [1.0]
    pacer = SendPacer(next_index, log, lambda: clock[0])
    sent: list[tuple[str, int]] = []

    def transport_send(node: str, message: dict[str, Any]) -> None:
        sent.append((node, message["entries"][-1][1]))
        clock[0] += BUDGET / 2  # each send takes half the budget
    send = pacer.wrap(transport_send)

    def step() -> None:  # as PySyncObj's loop does: send from the next index while it is in the log
        while next_index["a"] <= log[-1][1]:
            batch = next_index["a"]
            next_index["a"] = batch + 10
            send("a", entries(batch, batch + 9))
    pacer.step(step)
    # Half the budget spent after the first, all of it after the second, past it after the third.
    assert sent == [("a", 20), ("a", 30), ("a", 40)]
    assert next_index == {"a": 41}, "put back where the follower's next batch starts"


def test_every_follower_gets_a_batch_in_every_pass_even_past_the_budget() -> None:
    log = [(NO_OP, i, 1) for i in range(1, 101)]
    next_index = {"a": 11, "b": 11}
    clock = [1.0]
    pacer = SendPacer(next_index, log, lambda: clock[0])
    sent: list[str] = []

    def transport_send(node: str, message: dict[str, Any]) -> None:
        sent.append(node)
        clock[0] += BUDGET * 2  # each batch alone is over the budget
    send = pacer.wrap(transport_send)

    def step() -> None:
        for node in ("a", "b"):
            while next_index[node] <= log[-1][1]:
                next_index[node] += 10
                send(node, entries(next_index[node] - 10, next_index[node] - 1))
    pacer.step(step)
    assert sent == ["a", "b"]
    assert next_index == {"a": 21, "b": 21}


def test_a_follower_that_is_not_behind_is_never_parked() -> None:
    log = [(NO_OP, i, 1) for i in range(1, 11)]
    next_index = {"a": 11}
    clock = [1.0]
    pacer = SendPacer(next_index, log, lambda: clock[0])
    send = pacer.wrap(lambda node, message: None)

    def step() -> None:
        clock[0] += BUDGET * 2
        send("a", entries(11, 10) | {"entries": []})  # a heartbeat
        send("a", entries(11, 10) | {"entries": []})
        assert next_index == {"a": 11}
    pacer.step(step)


def test_a_follower_one_entry_behind_is_parked_too() -> None:
    log = [(NO_OP, i, 1) for i in range(1, 11)]
    next_index = {"a": 10}  # it lacks the last entry
    clock = [1.0]
    pacer = SendPacer(next_index, log, lambda: clock[0])
    send = pacer.wrap(lambda node, message: None)
    seen: list[int] = []

    def step() -> None:
        send("a", entries(8, 9))
        clock[0] += BUDGET * 2
        send("a", entries(8, 9))
        seen.append(next_index["a"])
    pacer.step(step)
    assert seen == [11] and next_index == {"a": 10}


def test_outside_a_send_step_nothing_is_paced() -> None:
    log = [(NO_OP, i, 1) for i in range(1, 101)]
    next_index = {"a": 11}
    clock = [1.0]
    pacer = SendPacer(next_index, log, lambda: clock[0])
    send = pacer.wrap(lambda node, message: None)
    send("a", entries(11, 20))  # before any step
    assert next_index == {"a": 11} and not pacer.spent_for("a")
    pacer.step(lambda: None)  # a step that has ended
    send("a", entries(11, 20))
    clock[0] += 1.0
    send("a", entries(21, 30))
    assert next_index == {"a": 11} and not pacer.spent_for("a")


def test_a_leader_sends_a_far_behind_follower_its_log_over_several_passes(tmp_path: Path) -> None:
    """PySyncObj's own send step on a real leader: a follower that lacks 3,000 entries (about
    90 batches, each taking 1 ms to send) is sent at most the budget's worth (7.8 ms) in one
    pass, where plain PySyncObj sends for 50 ms; and it gets all of them over the next passes."""
    with harnesses(tmp_path) as make:
        h = make()
        h.lead()
        node = h.node
        internals = node.internals

        def append_many() -> None:
            log = internals.raft_log
            for _ in range(3000):
                log.add(NO_OP * 2000, log[-1][1] + 1, node.raftCurrentTerm)
        h.on_tick(append_many)
        last = h.on_tick(lambda: internals.raft_log[-1][1])
        h.wire.probe = lambda message: time.sleep(0.001)  # a send takes 1 ms

        def appends_in_one_step() -> int:
            before = len(h.wire.sent)
            internals.next_index[h.peer] = 2
            node._SyncObj__sendAppendEntries()
            return sum(1 for m in h.wire.sent[before:]
                       if type(m) is dict and m.get("type") == "append_entries")
        sent_in_one_step = h.on_tick(appends_in_one_step)
        assert 1 <= sent_in_one_step <= BUDGET / 0.001 + 2
        assert h.on_tick(lambda: internals.next_index[h.peer]) <= last, "more left for later"
        # The follower acknowledges what it got; over the next passes it gets the rest.
        def caught_up() -> bool:
            got = h.on_tick(lambda: max(
                (m["entries"][-1][1] for m in h.wire.sent if type(m) is dict
                 and m.get("type") == "append_entries" and m.get("entries")), default=0))
            if got:
                h.reply(next_node_idx(got + 1, success=True, reset=False))
            return got == last
        wait_for(caught_up, "the follower to be sent the whole log")
