"""When a pass of the driven tick loop may end waiting in poll() (``raft_node.may_wait``)."""

from __future__ import annotations

from kvstore.node.raft_node import MAX_APPLY_PER_PASS, may_wait


def test_a_pass_that_applies_all_that_is_committed_may_wait() -> None:
    assert may_wait(False, commit_index=10, last_applied=10, restoring=False)
    assert may_wait(False, commit_index=11, last_applied=10, restoring=False)  # the usual case
    assert may_wait(False, commit_index=10 + MAX_APPLY_PER_PASS, last_applied=10,
                    restoring=False)


def test_a_pass_that_cannot_apply_it_all_does_not_wait() -> None:
    assert not may_wait(False, commit_index=11 + MAX_APPLY_PER_PASS, last_applied=10,
                        restoring=False)


def test_a_queued_command_is_shipped_by_the_next_pass_at_once() -> None:
    assert not may_wait(True, commit_index=10, last_applied=10, restoring=False)
    assert not may_wait(True, commit_index=10, last_applied=10, restoring=True)


def test_while_restoring_nothing_is_applied_so_it_may_wait() -> None:
    assert may_wait(False, commit_index=10_000, last_applied=10, restoring=True)
