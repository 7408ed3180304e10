"""Group commit on the state machine side: a batch is applied exactly as its entries would be
one by one, each with its own session (``StateMachine.apply_batch``)."""

from __future__ import annotations

import random

from kvstore import StateMachine, encode_entry, ops, results
from kvstore.entry import decode_batch, encode_batch
from kvstore.proto.log_pb2 import Code
from session import Session, new_session

CLUSTER = 9


def entries() -> list[bytes]:
    a, b = new_session(CLUSTER, random.Random(1)), new_session(CLUSTER, random.Random(2))
    log = []
    for s in (a, b):
        s.prepare_for_register()
        log.append(encode_entry(s))
        s.prepare_for_propose()
    log.append(encode_entry(a, ops.incr(b"n")))
    log.append(encode_entry(b, ops.incr(b"n", 10)))
    log.append(encode_entry(a, ops.incr(b"n")))  # a retry of a's proposal, in the same batch
    log.append(encode_entry(Session(CLUSTER), ops.get(b"n")))
    return log


def test_a_batch_is_applied_like_its_entries_one_by_one() -> None:
    one_by_one, batched = StateMachine(CLUSTER), StateMachine(CLUSTER)
    expected = [one_by_one.apply(e) for e in entries()]
    assert batched.apply_batch(encode_batch(entries())) == expected
    assert batched.snapshot() == one_by_one.snapshot()


def test_each_entry_of_a_batch_is_deduplicated_on_its_own() -> None:
    sm = StateMachine(CLUSTER)
    answers = [results.decode(r) for r in sm.apply_batch(encode_batch(entries()))]
    assert answers[2].number == 1 and answers[4].number == 1, "the retry got the cached answer"
    assert answers[5].value == b"11" and sm.data[b"n"] == b"11"


def test_a_batch_that_does_not_decode_applies_nothing() -> None:
    sm = StateMachine(CLUSTER)
    before = sm.snapshot()
    assert sm.apply_batch(b"\xff\x00") == []
    assert sm.apply_batch(encode_batch(entries()) + b"\x78\x01") == [], "not canonical"
    assert sm.snapshot() == before


def test_an_entry_that_does_not_decode_inside_a_batch_is_an_error_result_in_its_place() -> None:
    sm = StateMachine(CLUSTER)
    answers = [results.decode(r) for r in sm.apply_batch(encode_batch([b"\xff", *entries()]))]
    assert answers[0].code == Code.MALFORMED_ENTRY and len(answers) == len(entries()) + 1


def test_batch_encoding_round_trips() -> None:
    assert decode_batch(encode_batch(entries())) == entries()
    assert decode_batch(encode_batch([])) == []
