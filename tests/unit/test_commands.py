"""Commands (``kvstore.commands``): what each does, and that bad input is an error result.

Every case goes through ``StateMachine.apply`` with a no-op session, so it also checks that
apply turns each failure into a result instead of raising (PySyncObj defect D5).
"""

from __future__ import annotations

import pytest

from kvstore import StateMachine, encode_entry, ops, results
from kvstore.commands import static_error
from kvstore.limits import INT64_MAX, INT64_MIN, MAX_KEY_BYTES, MAX_VALUE_BYTES
from kvstore.proto.log_pb2 import Code, Command, Result
from session import new_noop_session, new_session

CLUSTER = 3


@pytest.fixture
def sm() -> StateMachine:
    return StateMachine(CLUSTER)


def run(sm: StateMachine, command: Command) -> Result:
    return results.decode(sm.apply(encode_entry(new_noop_session(CLUSTER), command)))


def test_put_then_get(sm: StateMachine) -> None:
    assert run(sm, ops.put(b"k", b"v")).code == Code.OK
    got = run(sm, ops.get(b"k"))
    assert got.found and got.value == b"v"


def test_get_missing_key_is_not_found(sm: StateMachine) -> None:
    got = run(sm, ops.get(b"nope"))
    assert got.code == Code.OK and not got.found


def test_empty_value_is_found(sm: StateMachine) -> None:
    run(sm, ops.put(b"k", b""))
    assert run(sm, ops.get(b"k")).found


def test_delete_reports_whether_the_key_existed(sm: StateMachine) -> None:
    run(sm, ops.put(b"k", b"v"))
    assert run(sm, ops.delete(b"k")).count == 1
    assert run(sm, ops.delete(b"k")).count == 0
    assert b"k" not in sm.data


def test_delete_prefix_counts_removed_keys(sm: StateMachine) -> None:
    for key in (b"a/1", b"a/2", b"b/1"):
        run(sm, ops.put(key, b"v"))
    assert run(sm, ops.delete(b"a/", prefix=True)).count == 2
    assert list(sm.data) == [b"b/1"]


def test_range_returns_sorted_prefix_matches_with_limit(sm: StateMachine) -> None:
    for key in (b"p/3", b"p/1", b"q", b"p/2"):
        run(sm, ops.put(key, key.upper()))
    listed = run(sm, ops.range_(b"p/", limit=2))
    assert [(kv.key, kv.value) for kv in listed.kvs] == [(b"p/1", b"P/1"), (b"p/2", b"P/2")]
    keys_only = run(sm, ops.range_(b"p/", keys_only=True))
    assert [kv.key for kv in keys_only.kvs] == [b"p/1", b"p/2", b"p/3"]
    assert all(kv.value == b"" for kv in keys_only.kvs) and keys_only.count == 3


def test_incr_counts_from_zero_and_returns_the_new_value(sm: StateMachine) -> None:
    assert run(sm, ops.incr(b"n", 5)).number == 5
    assert run(sm, ops.incr(b"n", -7)).number == -2
    assert sm.data[b"n"] == b"-2"


@pytest.mark.parametrize("stored", [b"abc", b"1.5", b" 1", b"+1", b"01", b"1_000", b"", b"-", b"-0", b"9223372036854775808",
     b"-9223372036854775809"])
def test_incr_on_a_non_integer_is_wrong_type(sm: StateMachine, stored: bytes) -> None:
    sm.data[b"n"] = stored
    result = run(sm, ops.incr(b"n"))
    assert (result.code, result.message) == (Code.WRONG_TYPE, "the value is not a decimal int64")
    assert sm.data[b"n"] == stored


@pytest.mark.parametrize(("start", "delta"), [(INT64_MAX, 1), (INT64_MIN, -1)])
def test_incr_out_of_int64_range_is_refused(sm: StateMachine, start: int, delta: int) -> None:
    sm.data[b"n"] = str(start).encode()
    result = run(sm, ops.incr(b"n", delta))
    assert (result.code, result.message) == (
        Code.OUT_OF_RANGE, f"{start} + {delta} leaves the int64 range")
    assert sm.data[b"n"] == str(start).encode()


@pytest.mark.parametrize(("start", "delta", "end"), [(INT64_MAX - 1, 1, INT64_MAX),
                                                     (INT64_MIN + 1, -1, INT64_MIN)])
def test_incr_may_reach_either_end_of_the_int64_range(sm: StateMachine, start: int, delta: int,
                                                      end: int) -> None:
    sm.data[b"n"] = str(start).encode()
    assert run(sm, ops.incr(b"n", delta)).code == Code.OK
    assert sm.data[b"n"] == str(end).encode()


def test_put_many_stores_every_pair_and_counts_them(sm: StateMachine) -> None:
    run(sm, ops.put(b"b", b"old"))
    assert run(sm, ops.put_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"")])).count == 3
    assert dict(sm.data.items()) == {b"a": b"1", b"b": b"2", b"c": b""}


def test_append_returns_the_new_length(sm: StateMachine) -> None:
    assert run(sm, ops.append(b"l", b"ab")).length == 2
    assert run(sm, ops.append(b"l", b"cde")).length == 5
    assert sm.data[b"l"] == b"abcde"


def test_append_past_the_value_limit_is_refused(sm: StateMachine) -> None:
    sm.data[b"l"] = b"x" * MAX_VALUE_BYTES
    result = run(sm, ops.append(b"l", b"y"))
    assert (result.code, result.message) == (Code.VALUE_TOO_LARGE, TOO_LONG_VALUE)
    assert len(sm.data[b"l"]) == MAX_VALUE_BYTES


def test_cas_swaps_when_expected_matches(sm: StateMachine) -> None:
    run(sm, ops.put(b"k", b"old"))
    result = run(sm, ops.cas(b"k", b"new", expected=b"old"))
    assert result.swapped and result.value == b"new" and sm.data[b"k"] == b"new"


def test_cas_reports_the_current_value_when_it_does_not_swap(sm: StateMachine) -> None:
    run(sm, ops.put(b"k", b"now"))
    result = run(sm, ops.cas(b"k", b"new", expected=b"old"))
    assert not result.swapped and result.found and result.value == b"now"


def test_cas_expect_absent(sm: StateMachine) -> None:
    assert run(sm, ops.cas(b"k", b"first", expected=None)).swapped
    second = run(sm, ops.cas(b"k", b"second", expected=None))
    assert not second.swapped and second.value == b"first"


def test_cas_with_empty_expected_does_not_match_an_absent_key(sm: StateMachine) -> None:
    assert not run(sm, ops.cas(b"k", b"v", expected=b"")).swapped


TOO_LONG_KEY = f"key is {MAX_KEY_BYTES + 1} bytes, over {MAX_KEY_BYTES}"
TOO_LONG_VALUE = f"value is {MAX_VALUE_BYTES + 1} bytes, over {MAX_VALUE_BYTES}"


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        (ops.put(b"", b"v"), Code.INVALID_ARGUMENT, "the key is empty"),
        (ops.put(b"k" * (MAX_KEY_BYTES + 1), b"v"), Code.KEY_TOO_LARGE, TOO_LONG_KEY),
        (ops.put(b"k", b"v" * (MAX_VALUE_BYTES + 1)), Code.VALUE_TOO_LARGE, TOO_LONG_VALUE),
        (ops.get(b"k" * (MAX_KEY_BYTES + 1)), Code.KEY_TOO_LARGE, TOO_LONG_KEY),
        (ops.delete(b"k" * (MAX_KEY_BYTES + 1)), Code.KEY_TOO_LARGE, TOO_LONG_KEY),
        (ops.append(b"k" * (MAX_KEY_BYTES + 1), b"v"), Code.KEY_TOO_LARGE, TOO_LONG_KEY),
        (ops.incr(b""), Code.INVALID_ARGUMENT, "the key is empty"),
        (ops.cas(b"k", b"v" * (MAX_VALUE_BYTES + 1), expected=None), Code.VALUE_TOO_LARGE,
         TOO_LONG_VALUE),
        (ops.range_(b"p" * (MAX_KEY_BYTES + 1)), Code.KEY_TOO_LARGE,
         f"prefix is {MAX_KEY_BYTES + 1} bytes, over {MAX_KEY_BYTES}"),
        (Command(), Code.INVALID_ARGUMENT, "the request carries no command"),
        (ops.put_many([(b"a", b"1"), (b"", b"v")]), Code.INVALID_ARGUMENT, "the key is empty"),
        (ops.put_many([(b"a", b"1"), (b"b", b"v" * (MAX_VALUE_BYTES + 1))]),
         Code.VALUE_TOO_LARGE, TOO_LONG_VALUE),
    ],
)
def test_bad_commands_are_error_results_and_change_nothing(
    sm: StateMachine, command: Command, code: int, message: str
) -> None:
    """The whole message too: every replica returns these bytes, and a client shows them."""
    before = sm.snapshot()
    result = run(sm, command)
    assert (result.code, result.message) == (code, message)
    assert sm.snapshot() == before


def test_limits_are_inclusive(sm: StateMachine) -> None:
    key, value = b"k" * MAX_KEY_BYTES, b"v" * MAX_VALUE_BYTES
    assert run(sm, ops.put(key, value)).code == Code.OK


def test_query_reads_locally_without_touching_sessions(sm: StateMachine) -> None:
    """A local read changes nothing a snapshot holds, the session store's LRU order and cached
    results included: replicas answer reads differently, and must still evict alike."""
    oldest, newest = new_session(CLUSTER), new_session(CLUSTER)
    for session in (oldest, newest):  # registered in this order: ``oldest`` is evicted first
        session.prepare_for_register()
        sm.apply(encode_entry(session))
        session.prepare_for_propose()
        sm.apply(encode_entry(session, ops.put(b"k", b"v")))  # a cached result each
    assert [s.client_id for s in sm.sessions] == [oldest.client_id, newest.client_id]
    before = sm.snapshot()
    assert sm.query(ops.get(b"k")).value == b"v"
    assert sm.query(ops.put(b"k", b"x")).code == Code.INVALID_ARGUMENT
    assert sm.snapshot() == before


def test_every_field_of_each_answer(sm: StateMachine) -> None:
    """What each command answers, field by field (the tests above look at one field each)."""
    run(sm, ops.put(b"a/1", b"x"))
    assert run(sm, ops.delete(b"a/", prefix=True)) == results.ok(count=1, found=True)
    assert run(sm, ops.delete(b"a/", prefix=True)) == results.ok(count=0, found=False)
    assert run(sm, ops.delete(b"gone")) == results.ok(count=0, found=False)
    assert run(sm, ops.get(b"gone")) == results.ok(found=False, value=b"")
    assert run(sm, ops.cas(b"c", b"new", expected=None)) == results.ok(
        swapped=True, found=True, value=b"new")
    assert run(sm, ops.cas(b"absent", b"new", expected=b"old")) == results.ok(
        swapped=False, found=False, value=b"")
    assert run(sm, ops.put(b"p", b"v")) == results.ok()
    assert run(sm, ops.incr(b"n", 5)) == results.ok(number=5)
    assert run(sm, ops.append(b"l", b"ab")) == results.ok(length=2)


def test_a_prefix_delete_takes_the_prefix_limit_and_an_empty_prefix(sm: StateMachine) -> None:
    """A prefix is bounded like a key but may be empty: an empty prefix deletes every key, as
    in etcd."""
    too_long = run(sm, ops.delete(b"p" * (MAX_KEY_BYTES + 1), prefix=True))
    assert (too_long.code, too_long.message) == (
        Code.KEY_TOO_LARGE, f"prefix is {MAX_KEY_BYTES + 1} bytes, over {MAX_KEY_BYTES}")
    for key in (b"a", b"b"):
        run(sm, ops.put(key, b"v"))
    assert run(sm, ops.delete(b"", prefix=True)) == results.ok(count=2, found=True)
    assert sm.data == {}


@pytest.mark.parametrize("command", [
    ops.put(b"k", b"v" * (MAX_VALUE_BYTES + 1)),
    ops.append(b"k", b"v" * (MAX_VALUE_BYTES + 1)),
    ops.cas(b"k", b"v" * (MAX_VALUE_BYTES + 1), expected=None),
], ids=["put", "append", "cas"])
def test_an_oversize_value_is_refused_before_the_log(command: Command) -> None:
    """``static_error`` is what the API server checks before a command reaches the log; every
    command that writes a value is bounded there, not only inside apply."""
    refused = static_error(command)
    assert refused is not None
    assert (refused.code, refused.message) == (Code.VALUE_TOO_LARGE, TOO_LONG_VALUE)
