"""Each misuse of a ``Session`` is refused with its own error and whole message.

The messages are what a developer embedding the client reads when a step of the protocol is
out of order; ``tests/unit/test_session.py`` checks which steps are refused, this file what
each refusal says.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from session import (
    ClusterMismatchError,
    SessionStateError,
    SessionValueError,
    new_noop_session,
    new_session,
)
from session.session import Session


def completed_once() -> Session:
    session = new_session(1)
    session.prepare_for_propose()
    session.proposal_completed()
    return session


def prepared_for_register() -> Session:
    session = new_session(1)
    session.prepare_for_register()
    return session


@pytest.mark.parametrize("misuse, error, message", [
    pytest.param(lambda: new_noop_session(1).prepare_for_propose(), SessionStateError,
                 "a no-op session has no series to prepare", id="prepare-a-noop-session"),
    pytest.param(lambda: new_noop_session(1).proposal_completed(), SessionStateError,
                 "proposal_completed() on a no-op session", id="complete-a-noop-session"),
    pytest.param(lambda: prepared_for_register().proposal_completed(), SessionStateError,
                 "proposal_completed() after a register or unregister request",
                 id="complete-a-register"),
    pytest.param(lambda: completed_once().prepare_for_propose(), SessionStateError,
                 "prepare_for_propose() on a session that has completed proposals up to 1; "
                 "it is called once, right after registering", id="prepare-twice"),
    pytest.param(lambda: Session(1, 5, 7, 3).proposal_completed(), SessionStateError,
                 "proposal_completed() out of order: series_id 7 is not responded_to 3 + 1",
                 id="complete-out-of-order"),
    pytest.param(lambda: Session(1, 2, 3, -1), SessionValueError,
                 "responded_to must be an integer in [0, 2**64-1], got -1", id="negative"),
    pytest.param(lambda: Session(True, 2, 3, 0), SessionValueError,
                 "cluster_id must be an integer in [0, 2**64-1], got True", id="a-bool"),
    pytest.param(lambda: Session(1, 2**64, 3, 0), SessionValueError,
                 "client_id must be an integer in [0, 2**64-1], got 18446744073709551616",
                 id="past-uint64"),
    pytest.param(lambda: new_session(1).cluster_id_must_match(2), ClusterMismatchError,
                 "session belongs to cluster 1, not 2", id="another-cluster"),
])
def test_each_misuse_says_what_went_wrong(misuse: Callable[[], object], error: type[Exception],
                                         message: str) -> None:
    with pytest.raises(error) as refused:
        misuse()
    assert str(refused.value) == message


def test_the_largest_values_are_valid() -> None:
    session = Session(2**64 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1)
    assert session.series_id == 2**64 - 1
