"""The client's group commit (``kvstore.batching``): what goes out when, and nothing twice.

A model test drives ``GroupCommit`` with random interleavings of new proposals, calls ending
and proposals withdrawn, and checks the rules of the module docstring after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.batching import GroupCommit

Step = tuple[str, int]


def _size(item: tuple[int, int]) -> int:
    return item[1]


steps = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 500)),   # a proposal of that many bytes
    st.tuples(st.just("finish"), st.integers(0, 7)),  # the call at that position ends
    st.tuples(st.just("withdraw"), st.integers(0, 50)),
), max_size=120)


@settings(max_examples=200, deadline=None)
@given(steps, st.integers(1, 3), st.integers(1, 6), st.integers(200, 1000))
def test_group_commit_rules_hold_in_every_interleaving(
        script: list[Step], max_in_flight: int, max_items: int, max_bytes: int) -> None:
    group: GroupCommit[tuple[int, int]] = GroupCommit(
        _size, max_in_flight=max_in_flight, max_items=max_items, max_bytes=max_bytes)
    calls: list[list[tuple[int, int]]] = []   # in flight
    queued: list[tuple[int, int]] = []        # the model's queue
    sent: list[tuple[int, int]] = []
    withdrawn: set[int] = set()
    started = 0
    next_id = 0
    for kind, value in script:
        if kind == "add":
            item = (next_id, value)
            next_id += 1
            free = len(calls) < max_in_flight
            out = group.add(item)
            # A proposal goes out at once, alone, exactly when a call slot is free.
            assert (out is not None) == free
            if out is not None:
                assert out == [item]
                calls.append(out)
                started += 1
                sent.append(item)
            else:
                queued.append(item)
        elif kind == "finish" and calls:
            calls.pop(value % len(calls))
            for batch in group.finished():
                # Batches leave in arrival order, within the limits (a big one alone).
                assert batch == queued[:len(batch)]
                del queued[:len(batch)]
                assert 1 <= len(batch) <= max_items
                assert len(batch) == 1 or sum(s for _, s in batch) <= max_bytes
                if queued and len(batch) < max_items:  # it stopped for the size limit only
                    assert sum(s for _, s in batch) + queued[0][1] > max_bytes
                calls.append(batch)
                started += 1
                sent.extend(batch)
        elif kind == "withdraw":
            candidates = queued + [item for call in calls for item in call]
            if candidates:
                item = candidates[value % len(candidates)]
                was_queued = item in queued
                assert group.withdraw(item) == was_queued  # only a queued one comes back
                if was_queued:
                    queued.remove(item)
                    withdrawn.add(item[0])
        # Invariants: the limit of calls in flight; nobody waits while a slot is free.
        assert group.in_flight == len(calls) <= max_in_flight
        assert not queued or len(calls) == max_in_flight
        assert group.waiting == len(queued)
    ids = [i for i, _ in sent]
    assert len(ids) == len(set(ids)), "a proposal was sent twice"
    assert not withdrawn & set(ids), "a withdrawn proposal was sent"
    assert ids == sorted(ids), "proposals overtook each other"
    assert (group.calls, group.sent) == (started, len(sent))


def test_a_lone_proposal_never_waits() -> None:
    group: GroupCommit[str] = GroupCommit(len, max_in_flight=1)
    assert group.add("a") == ["a"]
    assert group.finished() == []
    assert group.add("b") == ["b"]  # nothing in flight again: at once, no linger


def test_proposals_arriving_during_a_call_share_the_next_one() -> None:
    group: GroupCommit[str] = GroupCommit(len, max_in_flight=1)
    assert group.add("a") == ["a"]
    assert group.add("b") is None
    assert group.add("c") is None
    assert group.finished() == [["b", "c"]]
    assert (group.calls, group.sent) == (2, 3)


def test_at_the_shipped_setting_a_proposal_waits_for_the_one_call_in_flight() -> None:
    """The default: one call in flight per endpoint (``MAX_IN_FLIGHT``); what arrives during
    it leaves together when it ends, and a lone proposal still goes out at once."""
    group: GroupCommit[str] = GroupCommit(len)
    assert group.add("a") == ["a"]
    assert group.add("b") is None
    assert group.add("c") is None
    assert group.finished() == [["b", "c"]]
    assert group.finished() == []
    assert group.add("d") == ["d"]


def test_finishing_without_a_call_in_flight_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        GroupCommit(len).finished()
