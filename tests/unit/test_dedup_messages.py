"""The words of the two refusals of ``kvstore.dedup`` (rules 5 and 7), whole.

Every replica returns these bytes (the result is replicated state), and a client shows them to
a person who must decide what to do: open a new session, or stop retrying an answered request.
A test that only looks for a fragment would let the rest change unnoticed.
"""

from __future__ import annotations

import random

from kvstore import StateMachine, encode_entry, ops, results
from kvstore.proto.log_pb2 import Code
from session import new_session

CLUSTER = 11


def test_a_proposal_of_an_unknown_session_says_to_open_a_new_one() -> None:
    sm = StateMachine(CLUSTER)
    session = new_session(CLUSTER, random.Random(1))
    session.prepare_for_propose()

    result = results.decode(sm.apply(encode_entry(session, ops.incr(b"n"))))

    assert (result.code, result.message) == (
        Code.SESSION_EXPIRED,
        f"session {session.client_id} is not registered (never opened, closed or evicted); "
        "the outcome of its earlier proposals is unknown, open a new session")


def test_a_proposal_the_client_acknowledged_says_so() -> None:
    sm = StateMachine(CLUSTER)
    session = new_session(CLUSTER, random.Random(2))
    session.prepare_for_register()
    sm.apply(encode_entry(session))
    session.prepare_for_propose()
    first = encode_entry(session, ops.incr(b"n"))
    sm.apply(first)
    series = session.series_id
    session.proposal_completed()
    sm.apply(encode_entry(session, ops.incr(b"n")))  # tells the store: series answered

    result = results.decode(sm.apply(first))

    assert (result.code, result.message) == (
        Code.ALREADY_RESPONDED,
        f"series {series} of session {session.client_id} was already answered and "
        f"acknowledged (responded_to={series})")
