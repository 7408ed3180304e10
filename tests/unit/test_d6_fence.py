"""D6: PySyncObj 0.3.17 deletes a follower's log entries without a conflict; our fence stops it.

The defect (shared/reference/pysyncobj-0.3.17.md, D6): the leader pipelines appends. A success
reply to an *older* append sets the leader's nextIndex for that follower back, so the leader
re-sends entries the follower already holds; the follower then deletes every entry after the
re-send's ``prevLogIdx``, applied ones included (it logs "truncating already-applied log
entries"), although nothing conflicts. Raft (thesis 3.5) deletes a follower's entries only at a
conflict, and moves a leader's nextIndex back only when a follower rejects an append.

How the tests drive it, deterministically: one ``RaftNode`` in this process, and the test plays
its only peer, message by message (``tests/unit/raft_harness.py``); what the node answers is
recorded where it leaves for the network.

Plain vs fenced: the plain node is the same ``RaftNode`` built with ``RaftOptions(d6_fence=False)``.
The fence is the only code of ours on the message path, so that node handles messages exactly as
PySyncObj 0.3.17 does. Each test that states Raft's rule runs on both; on the plain node it is
marked ``xfail(strict=True, raises=RaftRuleBroken)``: it must fail there, and only on the rule's
assertions (``with raft_rule(...)``), not in set-up; an upstream fix would turn it into a
failure to look at. Genuine conflicts and rejections must behave the same on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kvstore.node import OutcomeUnknown
from tests.unit.raft_harness import (
    LAST,
    Harness,
    append,
    harnesses,
    next_node_idx,
    transmission,
    wait_for,
)

TRUNCATION_LOG = "truncating already-applied log entries"
FENCE_LOGGER = "kvstore.node.d6"

FENCED = pytest.param(True, id="fenced")
PLAIN = pytest.param(False, id="plain")


class RaftRuleBroken(AssertionError):
    """An assertion of Raft's rule failed (see ``raft_rule``)."""


@contextmanager
def raft_rule(rule: str) -> Iterator[None]:
    """Marks the assertions that state ``rule``: the plain variants are expected to fail there
    and nowhere else (PySyncObj's own set-up checks are plain ``assert`` statements too)."""
    try:
        yield
    except AssertionError as exc:
        raise RaftRuleBroken(f"{rule}: {exc}") from exc


PLAIN_HAS_D6 = pytest.param(False, id="plain", marks=pytest.mark.xfail(
    strict=True, raises=RaftRuleBroken,
    reason="D6 is present in plain PySyncObj 0.3.17: it breaks the Raft rule asserted here"))


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[[bool], Harness]]:
    with harnesses(tmp_path) as make:
        yield lambda fenced: make(fenced=fenced)


@pytest.fixture(autouse=True)
def the_fence_never_fails(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No message of any test makes the fence itself raise (it would log and pass the message
    on unchanged, which hides a bug: see ``test_if_the_fence_fails_the_message_passes_unchanged``)."""
    yield
    failures = [r.getMessage() for r in caplog.get_records("call") if r.name == FENCE_LOGGER]
    assert not failures


def truncations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if TRUNCATION_LOG in r.getMessage()]


# -- follower side ------------------------------------------------------------------------------


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_stale_copy_of_held_entries_deletes_nothing(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """D6, follower side. Raft (thesis 3.5): a follower deletes entries only when one conflicts
    with the leader's (same index, different term). A re-sent copy of entries 4..5 after
    prevLogIdx 3, all matching what the follower holds, must leave its log 1..10 alone;
    plain PySyncObj cuts it back to 1..5, deleting applied entries."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)
    held = h.log()

    for _ in range(2):  # the same stale copy, twice
        h.receive(append(1, prev=(3, 1), entries=range(4, 6), commit=LAST))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == held
        assert not truncations(caplog)
    # The fence answers for its whole log: the leader's own term is its last entry's.
    assert h.last_reply() == next_node_idx(LAST + 1, success=True, reset=False)
    assert h.fence_counts() == {"d6_follower_tail_kept": 2}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_stale_copy_with_new_entries_appends_them_and_deletes_nothing(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """D6, follower side. Raft (thesis 3.5): only a conflict deletes entries. An append from
    prevLogIdx 3 carrying 4..12, where 4..10 match what the follower holds, must only add 11
    and 12; plain PySyncObj deletes 4..10 (applied) and writes them again."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)

    h.receive(append(1, prev=(3, 1), entries=range(4, LAST + 3), commit=LAST))
    h.receive(append(1, prev=(3, 1), entries=range(4, LAST + 5), commit=LAST))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, LAST + 5)]
        assert not truncations(caplog), "applied entries were deleted (and written again)"
    assert h.last_reply() == next_node_idx(LAST + 5, success=True, reset=False)
    assert h.fence_counts() == {"d6_follower_trimmed": 2}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_genuine_conflict_still_truncates(make_harness: Callable[[bool], Harness],
                                            fenced: bool) -> None:
    """The fence must not hide real conflicts (D6 is about non-conflicting appends). Raft
    (thesis 3.5): a follower holding uncommitted entries 6..10 of term 1 that a new leader of
    term 2 replaces from index 6 deletes 6..10 and takes the leader's 6..7."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=5)

    h.receive(append(2, prev=(5, 1), entries=range(6, 8), commit=5))

    log_after = h.log()
    with raft_rule("thesis 3.5: a conflicting entry and all that follow it are deleted"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, 6)] + [(6, 2), (7, 2)]
    assert h.fence_counts() == {}  # a conflict is PySyncObj's to handle


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_conflict_behind_entries_the_follower_lacks_still_truncates(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """The fence's per-entry conflict check. Raft (thesis 3.5, Figure 3.1 receiver rule 3): if
    an existing entry conflicts with a new one (same index, different term), delete it and all
    that follow it. A follower holding uncommitted 6..10 of term 1 gets 6..12 from a leader of
    term 2: it must end with the leader's 6..12. Trimming the append to the entries it lacks
    (11..12) would keep the conflicting term-1 entries 6..10 under the leader's 11..12, and break
    Log Matching. (Sending only 6..7 would not show this: the tail-term rule passes such an
    append through untouched.)"""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=5)

    h.receive(append(2, prev=(5, 1), entries=range(6, LAST + 3), commit=5))

    log_after = h.log()
    with raft_rule("thesis 3.5: a conflicting entry and all that follow it are deleted"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, 6)] + [
            (i, 2) for i in range(6, LAST + 3)]
        assert h.last_reply() == next_node_idx(LAST + 3, success=True, reset=False)


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_an_append_whose_prev_term_does_not_match_is_rejected(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """The fence's prevLogTerm check. Raft (Figure 3.1, AppendEntries receiver rule 2): reply
    false if the log holds no entry at prevLogIndex whose term matches prevLogTerm, whatever
    follows. The follower holds 2..10 of term 2; an append of term 2 after (5, term 1)
    carrying 6..7 of term 2 (which match what it holds) must be rejected, and change nothing.

    Under Log Matching an honest leader never sends this (entries 6..7 match, so entry 5
    matches too): the check is defence in depth. Without it the fence would count 6..7 as
    held, turn the append into a heartbeat at our last entry (tail-term rule) and answer
    success up to 10: a log that already diverged would be vouched for instead of repaired."""
    h = make_harness(fenced)
    h.follow(entries_term=2, commit=LAST)
    held = h.log()

    h.receive(append(2, prev=(5, 1), entries=range(6, 8), commit=LAST))

    log_after = h.log()
    with raft_rule("Figure 3.1: reply false if the entry at prevLogIndex has another term"):
        assert h.last_reply() == next_node_idx(5, success=False, reset=True)
        assert log_after == held


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_covered_append_from_a_newer_term_vouches_only_for_what_it_carried(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """The fence's tail-term rule. Raft (Figure 3.1): a success reply tells the leader the
    follower's log matches its own up to the append's last entry (the leader sets matchIndex
    to prevLogIndex + len(entries)), no further. The follower holds 2..10 of term 1; a leader
    of term 2 re-sends 4..5 (held, no conflict). Entries 6..10 of term 1 may be absent from
    that leader's log, so the answer must be "up to 5". Only when our last entry carries the
    sender's own term (one leader per term: our whole log is then its prefix) may the fence
    answer for everything we hold, as ``test_d6_a_stale_copy_of_held_entries_deletes_nothing``
    does at term 1; dropping the rule would answer "up to 10" here, and the leader could count
    this follower for entries it does not hold."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=5)

    for _ in range(2):
        h.receive(append(2, prev=(3, 1), entries=range(4, 6), commit=5, entries_term=1))

    with raft_rule("Figure 3.1: a success reply vouches for the append's entries, no more"):
        assert h.replies()[-2:] == [next_node_idx(6, success=True, reset=False)] * 2
        assert h.log()[:6] == [(1, 0)] + [(i, 1) for i in range(2, 6)]
    assert h.fence_counts() == ({"d6_follower_passthrough": 2} if fenced else {})


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_an_append_from_an_older_term_is_ignored(make_harness: Callable[[bool], Harness],
                                                 fenced: bool) -> None:
    """Why the fence needs no term check of its own. Raft (Figure 3.1, AppendEntries receiver
    rule 1): reply false if term < currentTerm. PySyncObj drops such an append before it reads
    any field (it does not even answer), so whatever the fence made of it changes nothing. The
    follower is at term 2 holding 2..10 of term 2; a stale leader of term 1 re-sends 4..12 of
    term 1 after entry 3, whose term conflicts: nothing may change, nothing is vouched for."""
    h = make_harness(fenced)
    h.follow(entries_term=2, commit=LAST)
    held, replies = h.log(), len(h.replies())

    h.receive(append(1, prev=(3, 2), entries=range(4, LAST + 3), commit=LAST, entries_term=1))

    log_after = h.log()
    with raft_rule("Figure 3.1: an append from an older term is refused"):
        assert log_after == held
        assert len(h.replies()) == replies
        assert h.node.raftCurrentTerm == 2


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_stale_copy_in_a_log_of_two_terms_deletes_nothing(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """D6 as above, on a log whose last entry has a newer term than the rest: the follower holds
    2..9 of term 1 and 10 of term 2; the leader of term 2 re-sends 9 (term 1) after 8. Nothing
    conflicts, so nothing may go; the follower answers for everything it holds (its last entry
    is the leader's term), which only a match on entry 8's own term and entry 10's allows."""
    h = make_harness(fenced)
    h.follow_in_two_terms(commit=5)
    held = h.log()

    h.receive(append(2, prev=(LAST - 2, 1), entries=[(LAST - 1, 1)], commit=5))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == held
    assert h.last_reply() == next_node_idx(LAST + 1, success=True, reset=False)
    assert h.fence_counts() == {"d6_follower_tail_kept": 1}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_new_entries_after_a_stale_copy_in_two_terms_follow_the_newest(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """The trimmed append must carry our last entry's term as its prevLogTerm: the follower
    holds 2..9 of term 1 and 10 of term 2; an append after 5 carrying 6..9 (term 1), 10 and 11
    (term 2) adds 11 and deletes nothing (plain PySyncObj deletes 6..10, applied, and writes
    them again)."""
    h = make_harness(fenced)
    h.follow_in_two_terms(commit=LAST - 1)

    entries = [(i, 1) for i in range(6, LAST)] + [(LAST, 2), (LAST + 1, 2)]
    h.receive(append(2, prev=(5, 1), entries=entries, commit=LAST - 1))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, LAST)] + [(LAST, 2), (LAST + 1, 2)]
        assert not truncations(caplog)
    assert h.last_reply() == next_node_idx(LAST + 2, success=True, reset=False)
    assert h.fence_counts() == {"d6_follower_trimmed": 1}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_stale_copy_from_the_first_entry_deletes_nothing(
        make_harness: Callable[[bool], Harness], fenced: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """The fence covers a re-send from the very first entry of the log (prevLogIdx 1, the
    initial no-op), not only from later ones."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)
    held = h.log()

    h.receive(append(1, prev=(1, 0), entries=range(2, 6), commit=LAST))

    log_after = h.log()
    with raft_rule("thesis 3.5: a follower deletes entries only at a conflict"):
        assert log_after == held
        assert not truncations(caplog)


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_conflict_at_the_followers_last_entry_still_truncates(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """The conflict check starts at the first entry of the append: the follower holds 2..10 of
    term 1; a leader of term 2 sends 10 and 11 of term 2 after 9. Entry 10 conflicts, so it goes
    and the leader's 10..11 take its place (the fence must not take 10 for held and send only
    11 on top of our conflicting 10)."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=5)

    h.receive(append(2, prev=(LAST - 1, 1), entries=range(LAST, LAST + 2), commit=5))

    log_after = h.log()
    with raft_rule("thesis 3.5: a conflicting entry and all that follow it are deleted"):
        assert log_after == [(1, 0)] + [(i, 1) for i in range(2, LAST)] + [(LAST, 2), (LAST + 1, 2)]
    assert h.fence_counts() == {}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_appends_at_and_past_the_end_of_the_log_are_pysyncobjs(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """The fence only handles appends that start inside the follower's log. One right after its
    last entry is a plain append; one past it (a gap) is rejected, PySyncObj asking for what
    follows its last entry (Figure 3.1: reply false if the log has no entry at prevLogIndex)."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)

    h.receive(append(1, prev=(LAST + 2, 1), entries=range(LAST + 3, LAST + 4), commit=LAST))
    gap_reply = h.last_reply()
    h.receive(append(1, prev=(LAST, 1), entries=range(LAST + 1, LAST + 3), commit=LAST))

    assert gap_reply == next_node_idx(LAST + 1, success=False, reset=True)
    assert h.log() == [(1, 0)] + [(i, 1) for i in range(2, LAST + 3)]
    assert h.last_reply() == next_node_idx(LAST + 3, success=True, reset=False)
    assert h.fence_counts() == {}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_transmitted_entry_is_left_to_pysyncobj(make_harness: Callable[[bool], Harness],
                                                  fenced: bool) -> None:
    """An entry too large for one append is sent in chunks (``transmission`` start...finish)
    that carry no ``entries``; the fence leaves them alone, so the entry lands at its own index
    after prevLogIdx. (Trimmed like an append, the last chunk would put it after our last
    entry instead, out of order.) The fence does not protect this path from D6: PySyncObj
    truncates after prevLogIdx, as it does for every append without the fence."""
    h = make_harness(fenced)
    h.follow(entries_term=1, commit=LAST)

    for chunk in transmission(1, prev=(3, 1), entry=(4, 1), commit=LAST):
        h.receive(chunk)

    assert h.log() == [(1, 0)] + [(i, 1) for i in range(2, 5)]
    assert h.last_reply() == next_node_idx(5, success=True, reset=False)
    assert h.fence_counts() == {}


def test_if_the_fence_fails_the_message_passes_unchanged(
        make_harness: Callable[[bool], Harness], caplog: pytest.LogCaptureFixture) -> None:
    """The fence runs inside PySyncObj's message handling: if it raises, the message must still
    reach PySyncObj unchanged (a lost append would stall the follower), and the failure is
    logged. Made to fail here by handing it a log it cannot read (PySyncObj keeps its own)."""
    h = make_harness(True)
    h.follow(entries_term=1, commit=5)

    class Unreadable:
        def __getitem__(self, index: object) -> Any:
            raise RuntimeError("unreadable log")

    readable, h.node.internals.raft_log = h.node.internals.raft_log, Unreadable()
    try:
        h.receive(append(2, prev=(5, 1), entries=range(6, 8), commit=5))
    finally:
        h.node.internals.raft_log = readable

    assert h.log() == [(1, 0)] + [(i, 1) for i in range(2, 6)] + [(6, 2), (7, 2)]
    failures = [r for r in caplog.get_records("call") if r.name == FENCE_LOGGER]
    assert [(r.getMessage(), r.exc_info is not None) for r in failures] == [
        ("d6 fence (follower) failed; message passed through unchanged", True)]
    caplog.clear()  # expected here: the autouse check is for every other test


# -- leader side --------------------------------------------------------------------------------


def lead_with_pipelined_appends(h: Harness) -> int:
    """Makes the node leader with entries 3..7 appended after its no-op at index 2 and sent to
    the peer (nextIndex 8) but not yet acknowledged (matchIndex 0). Returns the last index, 7."""
    h.lead()
    last = 7
    for index in range(3, last + 1):
        # Queued on the leader; with its only peer silent nothing commits, so no outcome comes.
        # One at a time: proposals waiting together would go out as one batch (one entry).
        with pytest.raises(OutcomeUnknown):
            h.node.propose(b"entry", timeout=0.0)
        wait_for(lambda i=index: h.log()[-1][0] == i, f"the leader to append entry {index}")
    wait_for(lambda: h.leader_indexes() == (last + 1, 0), "the leader to send up to its last entry")
    return last


@pytest.mark.parametrize("fenced", [FENCED, PLAIN_HAS_D6])
def test_d6_a_success_reply_to_an_older_append_does_not_move_next_index_back(
        make_harness: Callable[[bool], Harness], fenced: bool) -> None:
    """D6, leader side. Raft (thesis 3.5, Figure 3.1): the leader moves nextIndex back only when
    the follower rejects an append; a success says the follower holds entries up to that
    append's last one, which does not undo later appends already sent. The answer to the
    leader's first append (its no-op at 2: next 3) arrives after it sent 3..7: plain PySyncObj
    sets nextIndex back to 3 and re-sends 3..7, the stale copy of the tests above."""
    h = make_harness(fenced)
    last = lead_with_pipelined_appends(h)

    next_index, match_index = h.reply(next_node_idx(3, success=True, reset=False))
    again = h.reply(next_node_idx(4, success=True, reset=False))  # and to the next one

    with raft_rule("Figure 3.1: nextIndex moves back only when a follower rejects an append"):
        assert match_index == 2
        assert next_index == last + 1, "a success reply moved nextIndex back"
        assert again == (last + 1, 3)
    assert h.fence_counts() == {"d6_leader_next_index_kept": 2}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_success_reply_still_moves_next_index_forward(make_harness: Callable[[bool], Harness],
                                                        fenced: bool) -> None:
    """The fence holds nextIndex back from moving back, never from moving on. Raft (Figure
    3.1): after a rejection the leader retries from an earlier entry; the follower's success
    reply to that retry moves nextIndex and matchIndex forward to what it now holds."""
    h = make_harness(fenced)
    last = lead_with_pipelined_appends(h)
    assert h.reply(next_node_idx(3, success=False, reset=True)) == (3, 0)

    next_index, match_index = h.reply(next_node_idx(last + 1, success=True, reset=False))

    with raft_rule("Figure 3.1: a success reply moves matchIndex and nextIndex forward"):
        assert (next_index, match_index) == (last + 1, last)
    assert h.fence_counts() == {}


@pytest.mark.parametrize("fenced", [FENCED, PLAIN])
def test_a_rejection_still_moves_next_index_back(make_harness: Callable[[bool], Harness],
                                                 fenced: bool) -> None:
    """The fence holds back success replies only. Raft (Figure 3.1): when a follower rejects an
    append because its log does not match, the leader moves nextIndex back and retries."""
    h = make_harness(fenced)
    lead_with_pipelined_appends(h)

    next_index, match_index = h.reply(next_node_idx(3, success=False, reset=True))

    with raft_rule("Figure 3.1: after a rejection, the leader moves nextIndex back and retries"):
        assert (next_index, match_index) == (3, 0)


def test_an_acknowledgement_of_everything_sent_leaves_next_index_alone(
        make_harness: Callable[[bool], Harness]) -> None:
    """The common case: the follower acknowledges the leader's last append; nextIndex stays
    just past it, matchIndex reaches it, and the fence has nothing to hold back."""
    h = make_harness(True)
    last = lead_with_pipelined_appends(h)

    assert h.reply(next_node_idx(last + 1, success=True, reset=False)) == (last + 1, last)
    assert h.fence_counts() == {}


def test_the_plain_node_handles_messages_with_pysyncobj_alone(
        make_harness: Callable[[bool], Harness]) -> None:
    """What makes the plain variant plain: without the fence, the transport hands messages
    straight to PySyncObj's own handler; with it, to the fence."""
    plain, fenced = make_harness(False).node, make_harness(True).node
    assert plain.internals.transport._onMessageReceivedCallback == plain._SyncObj__onMessageReceived
    assert fenced.internals.transport._onMessageReceivedCallback != fenced._SyncObj__onMessageReceived
