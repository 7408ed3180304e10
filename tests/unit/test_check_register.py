"""check_register on small hand-made histories, each checkable by eye.

Times are small integers; ``put(p, "a", 0, 10)`` is process p writing "a", called at 0 and
returning at 10. A status other than ok is given by keyword; ``history`` numbers the ops.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.check.history import HistoryError, Op
from kvstore.check.linearizable import NONLINEARIZABLE, check_register
from kvstore.check.verdict import BUDGET, CheckResult


def put(p: int, value: str, call: int, ret: int | None, status: str = "ok", key: str = "x") -> Op:
    return Op(-1, p, "put", key, value, call, ret, status, None)


def get(p: int, result: str | None, call: int, ret: int | None, status: str = "ok",
        key: str = "x") -> Op:
    return Op(-1, p, "get", key, None, call, ret, status, result)


def cas(p: int, expected: str | None, new: str, swapped: bool | None, call: int,
        ret: int | None, status: str = "ok", key: str = "x") -> Op:
    return Op(-1, p, "cas", key, [expected, new], call, ret, status, swapped)


def history(*ops: Op) -> list[Op]:
    for index, op in enumerate(ops):
        op.index = index
    return list(ops)


def check(*ops: Op, **options: Any) -> CheckResult:
    return check_register(history(*ops), **options)


def assert_valid(*ops: Op) -> None:
    result = check(*ops)
    assert result.valid and result.outcome == "valid", result.violations


def assert_not_linearizable(*ops: Op, key: str = "x") -> CheckResult:
    result = check(*ops)
    assert result.outcome == "invalid"
    assert [(v.kind, v.key) for v in result.violations] == [(NONLINEARIZABLE, key)]
    return result


# --- sequential histories ----------------------------------------------------------------------


def test_an_empty_history_is_linearizable() -> None:
    assert_valid()


def test_a_key_starts_absent() -> None:
    assert_valid(get(0, None, 0, 1))
    assert_not_linearizable(get(0, "a", 0, 1))


def test_a_read_after_a_completed_write_sees_it() -> None:
    assert_valid(put(0, "a", 0, 10), get(1, "a", 20, 30))


def test_a_stale_read_after_a_completed_write_is_not_linearizable() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), put(0, "b", 20, 30), get(1, "a", 40, 50))


def test_reading_absent_after_a_completed_write_is_not_linearizable() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), get(1, None, 20, 30))


def test_the_violation_names_the_key_the_last_ops_placed_and_the_op_that_could_not_be() -> None:
    result = assert_not_linearizable(put(0, "a", 0, 10), put(0, "b", 20, 30), get(1, "a", 40, 50))
    violation = result.violations[0]
    assert violation.ops == [0, 1, 2]
    assert "'x'" in violation.message and "holding 'b'" in violation.message
    assert "#2 get -> 'a' (p1) cannot be placed" in violation.message


# --- concurrency -------------------------------------------------------------------------------


def test_a_read_concurrent_with_a_write_may_see_the_old_value() -> None:
    assert_valid(put(0, "a", 0, 10), get(1, None, 5, 15))


def test_a_read_concurrent_with_a_write_may_see_the_new_value() -> None:
    assert_valid(put(0, "a", 0, 10), get(1, "a", 5, 15))


def test_concurrent_writes_may_take_effect_in_either_order() -> None:
    assert_valid(put(0, "a", 0, 10), put(1, "b", 0, 10), get(2, "a", 20, 30))
    assert_valid(put(0, "a", 0, 10), put(1, "b", 0, 10), get(2, "b", 20, 30))


def test_a_read_cannot_see_an_older_value_than_a_read_that_finished_before_it() -> None:
    # Both reads overlap the write, but the first saw the new value and ended before the second
    # began: the second must see it too (no new-old inversion).
    assert_not_linearizable(put(0, "a", 0, 100), get(1, "a", 10, 20), get(2, None, 30, 40))


def test_touching_intervals_count_as_concurrent() -> None:
    # A clock tie: the get was called at the very nanosecond the put returned.
    assert_valid(put(0, "a", 0, 10), get(1, None, 10, 20))


def test_concurrent_reads_that_need_opposite_orders_are_not_linearizable() -> None:
    # p1 sees a then b, p2 sees b then a: the two writes cannot be ordered for both.
    assert_not_linearizable(
        put(0, "a", 0, 100), put(3, "b", 0, 100),
        get(1, "a", 10, 20), get(1, "b", 30, 40),
        get(2, "b", 10, 20), get(2, "a", 30, 40))


def test_keys_are_independent_and_the_violation_names_the_bad_one() -> None:
    result = assert_not_linearizable(
        put(0, "a", 0, 10, key="x"), get(1, "a", 20, 30, key="x"),
        put(0, "a", 0, 10, key="y"), get(1, None, 20, 30, key="y"), key="y")
    assert result.stats["keys"] == 2 and result.stats["nonlinearizable_keys"] == 1


# --- cas ---------------------------------------------------------------------------------------


def test_a_cas_expecting_absent_swaps_on_a_new_key() -> None:
    assert_valid(cas(0, None, "a", True, 0, 10), get(1, "a", 20, 30))


def test_a_cas_that_swapped_needs_the_expected_value() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), cas(1, "z", "b", True, 20, 30))


def test_a_cas_that_did_not_swap_needs_another_value() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), cas(1, "a", "b", False, 20, 30))
    assert_valid(put(0, "a", 0, 10), cas(1, "z", "b", False, 20, 30), get(2, "a", 40, 50))


def test_a_cas_that_swapped_is_seen_by_later_reads() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), cas(1, "a", "b", True, 20, 30), get(2, "a", 40, 50))


# --- failed ops --------------------------------------------------------------------------------


def test_a_failed_put_whose_value_is_read_is_a_violation() -> None:
    assert_not_linearizable(put(0, "a", 0, 10, status="fail"), get(1, "a", 20, 30))


def test_a_failed_put_is_otherwise_ignored() -> None:
    result = check(put(0, "a", 0, 10, status="fail"), get(1, None, 20, 30))
    assert result.valid and result.stats["ops_dropped"] == 1


def test_a_failed_cas_never_swapped() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), cas(1, "a", "b", None, 20, 30, status="fail"),
                            get(2, "b", 40, 50))


# --- unknown ops -------------------------------------------------------------------------------


def test_an_unknown_put_may_explain_a_read() -> None:
    assert_valid(put(0, "a", 0, 10, status="unknown"), get(1, "a", 20, 30))


def test_an_unknown_put_may_never_take_effect() -> None:
    assert_valid(put(0, "a", 0, 10, status="unknown"), get(1, None, 20, 30))


def test_an_unknown_put_may_take_effect_after_the_client_gave_up() -> None:
    # The client gave up at 10; a read at 20 still saw nothing, one at 40 sees the value.
    assert_valid(put(0, "a", 0, 10, status="unknown"), get(1, None, 20, 30), get(1, "a", 40, 50))


def test_an_unknown_put_without_a_return_time_is_fine() -> None:
    assert_valid(put(0, "a", 0, None, status="unknown"), get(1, "a", 20, 30))


def test_an_unknown_put_cannot_take_effect_before_it_was_called() -> None:
    assert_not_linearizable(get(1, "a", 0, 10), put(0, "a", 20, 30, status="unknown"))


def test_an_unknown_put_takes_effect_at_most_once() -> None:
    assert_not_linearizable(
        put(0, "a", 0, 10, status="unknown"), put(1, "b", 0, 10),
        get(2, "a", 20, 30), get(2, "b", 40, 50), get(2, "a", 60, 70))


def test_an_unknown_get_is_ignored_whatever_its_result() -> None:
    assert_valid(put(0, "a", 0, 10), get(1, "zzz", 20, 30, status="unknown"))


def test_an_unknown_cas_may_have_swapped() -> None:
    assert_valid(put(0, "a", 0, 10), cas(1, "a", "b", None, 20, 30, status="unknown"),
                 get(2, "b", 40, 50))


def test_an_unknown_cas_may_not_have_swapped() -> None:
    assert_valid(put(0, "a", 0, 10), cas(1, "a", "b", None, 20, 30, status="unknown"),
                 get(2, "a", 40, 50))


def test_an_unknown_cas_cannot_swap_from_a_value_the_register_never_held() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), cas(1, "z", "b", None, 20, 30, status="unknown"),
                            get(2, "b", 40, 50))


def test_an_unknown_write_nobody_read_can_explain_a_failed_cas() -> None:
    # Without the unknown put of "z" the cas, which expected the "a" that was there, would
    # have had to swap.
    assert_valid(put(0, "a", 0, 10), put(1, "z", 15, 20, status="unknown"),
                 cas(2, "a", "b", False, 30, 40), get(2, "a", 50, 60, status="unknown"))
    assert_not_linearizable(put(0, "a", 0, 10), cas(2, "a", "b", False, 30, 40))


def test_an_unknown_write_may_land_long_after_the_client_gave_up() -> None:
    # The client gave up on "z" at 5, before "a" was written; "z" can still land after "a".
    assert_valid(put(1, "z", 0, 5, status="unknown"), put(0, "a", 10, 20),
                 cas(2, "a", "b", False, 30, 40))


def test_an_unknown_write_cannot_explain_a_failed_cas_that_ended_before_it_was_called() -> None:
    assert_not_linearizable(put(0, "a", 0, 10), cas(2, "a", "b", False, 20, 30),
                            put(1, "z", 40, 50, status="unknown"))


def test_many_unknown_writes_nobody_read_do_not_hide_a_violation() -> None:
    # A leader crash leaves writes in doubt; a stale read after them is still caught, quickly.
    ops = []
    for n in range(150):
        t = 100 * n
        ops += [put(0, f"v{n}", t, t + 10), get(1, f"v{n}", t + 20, t + 30),
                put(2, f"lost{n}", t, t + 40, status="unknown")]
    ops.append(get(1, "v3", 100 * 150, 100 * 150 + 10))
    result = assert_not_linearizable(*ops)
    assert result.stats["steps"] < 100_000


# --- budget and input --------------------------------------------------------------------------


def test_an_exhausted_search_budget_is_reported_and_is_not_a_pass() -> None:
    result = check(put(0, "a", 0, 10), put(1, "b", 0, 10), get(2, "b", 20, 30),
                   max_steps_per_key=1)
    assert not result.valid
    assert result.outcome == "unknown"
    assert result.stats["budget_exhausted_keys"] == 1
    assert [v.kind for v in result.violations] == [BUDGET]
    assert "search budget exhausted" in result.violations[0].message


def test_an_ok_get_with_an_unusable_result_is_invalid_input() -> None:
    bad = get(0, "a", 0, 10)
    bad.result = ["a"]
    with pytest.raises(HistoryError):
        check(bad)


def test_an_ok_op_without_a_return_time_is_invalid_input() -> None:
    with pytest.raises(HistoryError):
        check(put(0, "a", 0, None))


def test_ops_of_other_models_are_refused() -> None:
    with pytest.raises(HistoryError, match="check_register judges put/get/cas"):
        check_register([Op(0, 0, "append", "x", "a", 0, 1, "ok", None)])
