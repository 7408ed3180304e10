"""check_list_append on small hand-made histories, each checkable by eye.

``append(p, "a", 0, 10)`` is process p appending "a", called at 0 and returning at 10;
``read(p, ["a"], 20, 30)`` a read of the whole list. ``history`` numbers the ops.
"""

from __future__ import annotations

import pytest

from kvstore.check.history import HistoryError, Op
from kvstore.check.list_append import (
    DUPLICATE,
    FUTURE,
    LOST,
    ORDER,
    PHANTOM,
    check_list_append,
)
from kvstore.check.verdict import CheckResult


def append(p: int, value: str, call: int, ret: int | None, status: str = "ok",
           key: str = "k") -> Op:
    return Op(-1, p, "append", key, value, call, ret, status, None)


def read(p: int, values: list[str] | None, call: int, ret: int | None, status: str = "ok",
         key: str = "k") -> Op:
    return Op(-1, p, "read", key, None, call, ret, status, values)


def check(*ops: Op) -> CheckResult:
    for index, op in enumerate(ops):
        op.index = index
    return check_list_append(list(ops))


def assert_valid(*ops: Op) -> None:
    result = check(*ops)
    assert result.valid, result.violations


def kinds(result: CheckResult) -> list[str]:
    return [v.kind for v in result.violations]


# --- valid histories ---------------------------------------------------------------------------


def test_an_empty_history_is_valid() -> None:
    assert_valid()


def test_reads_that_grow_by_the_appends_are_valid() -> None:
    assert_valid(read(0, [], 0, 5), append(1, "a", 10, 20), read(0, ["a"], 30, 40),
                 append(1, "b", 50, 60), read(0, ["a", "b"], 70, 80))


def test_a_read_concurrent_with_an_append_may_miss_it_or_see_it() -> None:
    assert_valid(append(1, "a", 0, 100), read(0, [], 10, 20), read(0, ["a"], 30, 40))


def test_concurrent_appends_may_land_in_either_order() -> None:
    assert_valid(append(0, "a", 0, 10), append(1, "b", 0, 10), read(2, ["b", "a"], 20, 30))


def test_an_unknown_append_may_never_land() -> None:
    assert_valid(append(0, "a", 0, 10, status="unknown"), read(1, [], 20, 30))


def test_an_unknown_append_may_land_after_the_client_gave_up() -> None:
    assert_valid(append(0, "a", 0, 10, status="unknown"), append(1, "b", 20, 30),
                 read(2, ["b", "a"], 40, 50))


def test_failed_and_unknown_reads_are_ignored() -> None:
    assert_valid(append(0, "a", 0, 10), read(1, ["junk"], 20, 30, status="fail"),
                 read(1, None, 40, 50, status="unknown"))


def test_a_read_invoked_at_the_instant_an_append_returned_may_miss_it() -> None:
    assert_valid(append(0, "a", 0, 10), read(1, [], 10, 20))


# --- duplicate ---------------------------------------------------------------------------------


def test_a_value_twice_in_a_read_is_a_duplicate() -> None:
    # A retried append applied twice.
    result = check(append(0, "a", 0, 10), read(1, ["a", "a"], 20, 30))
    assert kinds(result) == [DUPLICATE]
    assert result.violations[0].ops == [0, 1]
    assert "'a'" in result.violations[0].message


def test_one_duplicate_value_is_one_violation_however_many_reads_show_it() -> None:
    result = check(append(0, "a", 0, 10), read(1, ["a", "a"], 20, 30), read(1, ["a", "a"], 40, 50))
    assert kinds(result) == [DUPLICATE]
    assert result.violations[0].ops == [0, 1, 2]


# --- lost --------------------------------------------------------------------------------------


def test_an_acknowledged_append_missing_from_a_later_read_is_lost() -> None:
    result = check(append(0, "a", 0, 10), append(0, "b", 20, 30), read(1, ["a"], 40, 50))
    assert kinds(result) == [LOST]
    assert result.violations[0].ops == [1, 2]
    assert "acknowledged" in result.violations[0].message


def test_the_final_read_must_hold_every_acknowledged_append() -> None:
    result = check(append(0, "a", 0, 10), append(1, "b", 0, 10), read(2, ["b"], 1000, 1010))
    assert kinds(result) == [LOST]


def test_an_unknown_append_may_be_missing_from_the_final_read() -> None:
    assert_valid(append(0, "a", 0, 10, status="unknown"), read(2, [], 1000, 1010))


def test_a_value_once_read_cannot_disappear_from_a_later_read() -> None:
    # Even from an unknown append: the first read proved it landed.
    result = check(append(0, "a", 0, 10, status="unknown"), read(1, ["a"], 20, 30),
                   read(2, [], 40, 50))
    assert kinds(result) == [LOST]
    assert "seen by #1" in result.violations[0].message


def test_a_value_read_by_a_concurrent_read_may_be_missing_from_another() -> None:
    assert_valid(append(0, "a", 0, 100), read(1, ["a"], 10, 50), read(2, [], 20, 60))


# --- phantom -----------------------------------------------------------------------------------


def test_a_value_never_appended_is_a_phantom() -> None:
    result = check(append(0, "a", 0, 10), read(1, ["a", "ghost"], 20, 30))
    assert kinds(result) == [PHANTOM]
    assert "never appended" in result.violations[0].message


def test_a_value_appended_only_by_a_failed_op_is_a_phantom() -> None:
    result = check(append(0, "a", 0, 10, status="fail"), read(1, ["a"], 20, 30))
    assert kinds(result) == [PHANTOM]
    assert result.violations[0].ops == [0, 1]


def test_a_value_appended_to_another_key_is_a_phantom_here() -> None:
    result = check(append(0, "a", 0, 10, key="k1"), read(1, ["a"], 20, 30, key="k2"))
    assert kinds(result) == [PHANTOM]
    assert result.violations[0].key == "k2"


def test_many_phantoms_of_one_key_are_one_violation() -> None:
    result = check(read(1, ["p", "q", "r"], 0, 10), read(1, ["p", "q", "r", "s"], 20, 30))
    assert kinds(result) == [PHANTOM]
    assert "4 values" in result.violations[0].message


# --- order -------------------------------------------------------------------------------------


def test_reads_that_are_not_prefixes_of_one_list_are_an_order_violation() -> None:
    result = check(append(0, "a", 0, 100), append(1, "b", 0, 100),
                   read(2, ["a", "b"], 10, 110), read(3, ["b", "a"], 10, 110))
    assert kinds(result) == [ORDER]
    assert sorted(result.violations[0].ops) == [2, 3]


def test_one_odd_read_among_many_shows_up_as_at_most_two_pairs() -> None:
    ops = [append(0, v, 0, 1000) for v in "abcde"]
    ops += [read(1, list("abcde"[:n]), 10, 1010) for n in range(1, 6)]
    ops.append(read(2, ["a", "b", "x"], 10, 1010))  # a phantom, and off the common order
    result = check(*ops)
    orders = [v for v in result.violations if v.kind == ORDER]
    assert len(orders) == 2 and all(10 in v.ops for v in orders)


# --- future ------------------------------------------------------------------------------------


def test_a_read_of_a_value_appended_after_it_returned_is_from_the_future() -> None:
    result = check(read(1, ["a"], 0, 10), append(0, "a", 20, 30))
    assert kinds(result) == [FUTURE]
    assert result.violations[0].ops == [1, 0]


def test_an_unknown_append_cannot_be_read_before_it_was_invoked_either() -> None:
    result = check(read(1, ["a"], 0, 10), append(0, "a", 20, 30, status="unknown"))
    assert kinds(result) == [FUTURE]


# --- input -------------------------------------------------------------------------------------


def test_a_value_appended_twice_to_a_key_is_invalid_input() -> None:
    with pytest.raises(HistoryError, match="appended to 'k' twice"):
        check(append(0, "a", 0, 10), append(1, "a", 20, 30, status="fail"))


def test_an_ok_read_without_a_list_is_invalid_input() -> None:
    with pytest.raises(HistoryError):
        check(read(0, None, 0, 10))


def test_ops_of_other_models_are_refused() -> None:
    with pytest.raises(HistoryError, match="check_list_append judges append/read"):
        check_list_append([Op(0, 0, "put", "k", "a", 0, 1, "ok", None)])
