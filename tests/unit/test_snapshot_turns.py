"""Members take their snapshots one at a time (``kvstore.node.snapshot_turns``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvstore.node.snapshot_turns import my_turn

MEMBERS = ["127.0.0.1:7003", "127.0.0.1:7001", "127.0.0.1:7002"]


def test_three_members_take_turns_in_slots_of_a_third() -> None:
    every = 3000
    whose = {index: [m for m in MEMBERS if my_turn(index, every, MEMBERS, m, every + 1)]
             for index in range(0, 6000, 500)}
    assert all(len(turn) == 1 for turn in whose.values()), whose
    assert whose[0] == whose[500] == ["127.0.0.1:7001"]
    assert whose[1000] == ["127.0.0.1:7002"] and whose[2500] == ["127.0.0.1:7003"]
    assert whose[3000] == ["127.0.0.1:7001"]


def test_an_overdue_member_goes_whatever_the_turn() -> None:
    assert not my_turn(0, 3000, MEMBERS, "127.0.0.1:7003", 5999)
    assert my_turn(0, 3000, MEMBERS, "127.0.0.1:7003", 6000)


def test_alone_or_with_tiny_counts_every_index_is_a_turn() -> None:
    assert my_turn(7, 3000, [], "a", 3001)
    assert my_turn(7, 2, MEMBERS, "127.0.0.1:7003", 3)


@given(st.integers(0, 10**9), st.integers(3, 10**6), st.integers(1, 7))
def test_exactly_one_member_has_each_index_and_each_waits_less_than_every(
        index: int, every: int, n: int) -> None:
    members = [f"10.0.0.{i}:1" for i in range(n)]
    if every < n:
        return
    turns = [m for m in members if my_turn(index, every, members, m, every + 1)]
    assert len(turns) == 1
    # the same member's next turn comes within one period of ``every`` entries (or so)
    width = every // n
    later = [i for i in range(index + 1, index + n * width + 1, width)
             if my_turn(i, every, members, turns[0], every + 1)]
    assert later
