"""One round of appends in flight (``kvstore.node.append_rounds``): a leader's new proposals
wait while its last entry is on no majority yet, then leave together as one batch.

The rule is a choice of when entries are appended, not a Raft rule: Raft (thesis 3.5, 10.2)
lets a leader append and send at any time. So each test says what the rule promises (a lone
proposal is not delayed; what waits leaves in one batch; what waits is never appended by a
node that no longer leads) and the harnessed tests also run with the rule off, where the
batching assertion must fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvstore.node import NotApplied
from kvstore.node.append_rounds import round_open
from kvstore.node.outcomes import Pending
from tests.unit.raft_harness import Harness, append, harnesses, next_node_idx, wait_for

NOOP_INDEX = 2
"""A new leader's no-op (entry 1 is PySyncObj's initial one)."""
PASSES = 10
"""Passes of the tick loop a test lets go by to see that something does not happen."""

# -- the rule itself ------------------------------------------------------------------------


def test_a_leader_without_other_voters_never_waits() -> None:
    assert not round_open(7, {}, [])


def test_of_three_voters_one_follower_holding_the_entry_closes_the_round() -> None:
    assert not round_open(7, {"b": 7, "c": 0}, ["b", "c"])
    assert not round_open(7, {"b": 3, "c": 9}, ["b", "c"])
    assert round_open(7, {"b": 6, "c": 6}, ["b", "c"])


def test_of_five_voters_two_followers_are_needed() -> None:
    voters = ["b", "c", "d", "e"]
    assert round_open(7, {"b": 7, "c": 6, "d": 6, "e": 6}, voters)
    assert not round_open(7, {"b": 7, "c": 7, "d": 0, "e": 0}, voters)


def test_of_four_voters_two_of_four_copies_are_no_majority() -> None:
    voters = ["b", "c", "d"]
    assert round_open(7, {"b": 7, "c": 0, "d": 0}, voters)
    assert not round_open(7, {"b": 7, "c": 7, "d": 0}, voters)


def test_a_voter_not_yet_in_the_match_index_holds_nothing() -> None:
    """Not even the first entry: PySyncObj's own initial no-op."""
    assert round_open(1, {}, ["b", "c"])
    assert not round_open(1, {"b": 1}, ["b", "c"])


def test_followers_that_are_not_voters_do_not_count() -> None:
    """A learner's copy (in ``match_index``, not among ``voters``) closes no round."""
    assert round_open(7, {"learner": 7}, ["b", "c"])


# -- on a real leader -----------------------------------------------------------------------

RULE_ON = pytest.param(True, id="one-round-in-flight")
RULE_OFF = pytest.param(False, id="rule-off", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="without the rule each pass appends what is waiting, round open or not"))


@pytest.fixture
def make_leader(tmp_path: Path) -> Iterator[Callable[[bool], Harness]]:
    """A leader of three voters (the test plays both followers) whose no-op is acknowledged."""
    with harnesses(tmp_path) as make:
        def leader(rule: bool) -> Harness:
            h = make(peers=2, one_round_in_flight=rule)
            h.lead()
            wait_for(lambda: last_index(h) == NOOP_INDEX, "the leader's no-op")
            h.reply(next_node_idx(NOOP_INDEX + 1, success=True, reset=False))
            return h
        yield leader


def last_index(h: Harness) -> int:
    return h.log()[-1][0]


def submit(h: Harness, entry: bytes) -> Pending:
    waiter = Pending()
    h.node.submit(entry, waiter)
    return waiter


def let_passes_go_by(h: Harness) -> None:
    ticks = h.node.counters["ticks"]
    wait_for(lambda: h.node.counters["ticks"] >= ticks + PASSES, f"{PASSES} passes")


@pytest.mark.parametrize("rule", [RULE_ON, RULE_OFF])
def test_proposals_during_a_round_wait_for_it_and_leave_as_one_batch(
        make_leader: Callable[[bool], Harness], rule: bool) -> None:
    h = make_leader(rule)
    submit(h, b"a")
    wait_for(lambda: last_index(h) == NOOP_INDEX + 1, "a lone proposal appended at once")
    batches = h.node.counters["batches"]
    submit(h, b"b")
    let_passes_go_by(h)
    submit(h, b"c")
    let_passes_go_by(h)
    assert last_index(h) == NOOP_INDEX + 1, "appended while the round was open"
    h.reply(next_node_idx(NOOP_INDEX + 2, success=True, reset=False))  # a follower holds "a"
    wait_for(lambda: last_index(h) == NOOP_INDEX + 2, "the waiting proposals appended")
    let_passes_go_by(h)
    assert last_index(h) == NOOP_INDEX + 2
    assert h.node.counters["batches"] == batches + 1


def test_proposals_that_waited_are_refused_as_not_applied_once_the_node_stops_leading(
        make_leader: Callable[[bool], Harness]) -> None:
    h = make_leader(True)
    submit(h, b"a")
    wait_for(lambda: last_index(h) == NOOP_INDEX + 1, "a lone proposal appended at once")
    waiting = submit(h, b"b")
    let_passes_go_by(h)
    term = h.node.raftCurrentTerm
    h.receive(append(term + 1, prev=(NOOP_INDEX + 1, term), entries=[], commit=0))
    wait_for(lambda: waiting.event.is_set(), "an outcome for the waiting proposal")
    with pytest.raises(NotApplied, match="NOT_LEADER"):
        waiting.outcome()
    assert last_index(h) == NOOP_INDEX + 1, "the waiting proposal is in no log"
