"""check_counter and check_convergence on small hand-made cases, and the verdict types.

``incr(p, 2, 0, 10, 5)`` is process p adding 2, called at 0, returning at 10 with the new
value 5. An increment that is not ok has no result.
"""

from __future__ import annotations

import pytest

from kvstore.check.counter import OUT_OF_BOUNDS, OVER, REPEATED_VALUE, UNDER, check_counter
from kvstore.check.history import HistoryError, Op
from kvstore.check.verdict import BUDGET, DIVERGENCE, CheckResult, Violation, check_convergence


def incr(p: int, delta: int, call: int, ret: int | None, result: int | None = None,
         status: str = "ok", key: str = "c") -> Op:
    return Op(-1, p, "incr", key, delta, call, ret, status, result)


def check(*ops: Op, final: int) -> CheckResult:
    for index, op in enumerate(ops):
        op.index = index
    return check_counter(list(ops), final)


def kinds(result: CheckResult) -> list[str]:
    return [v.kind for v in result.violations]


# --- the final value ---------------------------------------------------------------------------


def test_no_increments_and_a_final_zero_is_valid() -> None:
    assert check(final=0).valid


def test_a_final_value_equal_to_the_acknowledged_increments_is_valid() -> None:
    assert check(incr(0, 1, 0, 10, 1), incr(1, 2, 20, 30, 3), final=3).valid


def test_a_final_value_under_the_acknowledged_increments_is_under() -> None:
    result = check(incr(0, 1, 0, 10, 1), incr(1, 2, 20, 30, 3), final=2)
    assert kinds(result) == [UNDER]
    assert "lost" in result.violations[0].message


def test_a_final_value_over_the_acknowledged_and_unknown_increments_is_over() -> None:
    # A retry applied twice.
    result = check(incr(0, 1, 0, 10, 1), incr(1, 2, 20, 30, status="unknown"), final=4)
    assert kinds(result) == [OVER]
    assert result.stats == {"ok_ops": 1, "unknown_ops": 1, "fail_ops": 0, "final_value": 4}


def test_unknown_increments_may_count_or_not() -> None:
    ops = [incr(0, 1, 0, 10, 1), incr(1, 2, 20, 30, status="unknown"),
           incr(2, 4, 20, 30, status="unknown")]
    assert all(check(*ops, final=final).valid for final in (1, 3, 5, 7))


def test_failed_increments_never_count() -> None:
    assert kinds(check(incr(0, 1, 0, 10, 1), incr(1, 2, 20, 30, status="fail"), final=3)) == [OVER]


def test_a_final_value_under_a_value_an_increment_returned_is_under() -> None:
    # An unknown increment explains the 3, but then the final value cannot be lower.
    result = check(incr(1, 2, 0, 5, status="unknown"), incr(0, 1, 0, 10, 3), final=1)
    assert kinds(result) == [UNDER]
    assert "went down" in result.violations[0].message
    assert result.violations[0].ops == [1]


# --- the values increments returned ------------------------------------------------------------


def test_two_increments_that_returned_the_same_value_are_a_repeated_value() -> None:
    result = check(incr(0, 1, 0, 10, 1), incr(1, 1, 0, 10, 1), final=2)
    assert kinds(result) == [REPEATED_VALUE]
    assert result.violations[0].ops == [0, 1]


def test_concurrent_increments_may_return_in_either_order() -> None:
    assert check(incr(0, 1, 0, 10, 2), incr(1, 1, 0, 10, 1), final=2).valid


def test_an_increment_below_what_was_acknowledged_before_it_began_is_out_of_bounds() -> None:
    result = check(incr(0, 1, 0, 10, 1), incr(1, 1, 20, 30, 5), incr(2, 1, 40, 50, 3),
                   incr(3, 3, 0, 35, status="unknown"), final=6)
    assert kinds(result) == [OUT_OF_BOUNDS]
    assert result.violations[0].ops == [2]
    assert "at least 6" in result.violations[0].message


def test_an_increment_above_everything_invoked_before_it_returned_is_out_of_bounds() -> None:
    result = check(incr(0, 1, 0, 10, 1), incr(1, 1, 20, 30, 4), final=4)
    assert kinds(result) == [OVER, OUT_OF_BOUNDS]  # 4 is over for the final value too
    assert result.violations[1].ops == [1]
    assert "at most 2" in result.violations[1].message


def test_an_unknown_increment_invoked_in_time_may_raise_a_later_value() -> None:
    assert check(incr(1, 5, 0, 5, status="unknown"), incr(0, 1, 10, 20, 6), final=6).valid


def test_an_unknown_increment_invoked_too_late_cannot_raise_a_value() -> None:
    result = check(incr(0, 1, 0, 10, 6), incr(1, 5, 20, 30, status="unknown"), final=6)
    assert kinds(result) == [OUT_OF_BOUNDS]


def test_touching_intervals_count_as_concurrent() -> None:
    assert check(incr(0, 1, 0, 10, 2), incr(1, 1, 10, 20, 1), final=2).valid


# --- input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 0])
def test_a_delta_that_is_not_positive_is_invalid_input(delta: int) -> None:
    with pytest.raises(HistoryError, match="must be positive"):
        check(incr(0, delta, 0, 10, delta), final=0)


def test_increments_of_several_counters_are_invalid_input() -> None:
    with pytest.raises(HistoryError, match="one counter"):
        check(incr(0, 1, 0, 10, 1, key="a"), incr(0, 1, 20, 30, 1, key="b"), final=1)


def test_ops_of_other_models_are_refused() -> None:
    with pytest.raises(HistoryError, match="check_counter judges incr"):
        check_counter([Op(0, 0, "get", "c", None, 0, 1, "ok", "1")], 1)


# --- convergence -------------------------------------------------------------------------------


def test_replicas_with_equal_digests_converged() -> None:
    result = check_convergence({"n1": "abc", "n2": "abc", "n3": "abc"})
    assert result.valid and result.stats == {"nodes": 3, "distinct_digests": 1}


def test_one_replica_has_converged_with_itself() -> None:
    assert check_convergence({"n1": "abc"}).valid


def test_replicas_with_different_digests_diverged_and_are_named() -> None:
    result = check_convergence({"n1": "abc", "n2": "xyz", "n3": "abc"})
    assert kinds(result) == [DIVERGENCE]
    assert "n1, n3: abc" in result.violations[0].message
    assert "n2: xyz" in result.violations[0].message


def test_no_digest_at_all_proves_nothing() -> None:
    result = check_convergence({})
    assert not result.valid and kinds(result) == [DIVERGENCE]


# --- verdicts ----------------------------------------------------------------------------------


def test_the_outcome_tells_valid_invalid_and_unknown_apart() -> None:
    budget = Violation(BUDGET, "x", "unknown (search budget exhausted)")
    wrong = Violation("lost", "x", "gone", [1])
    assert CheckResult.of([], {}).outcome == "valid"
    assert CheckResult.of([budget], {}).outcome == "unknown"
    assert CheckResult.of([budget, wrong], {}).outcome == "invalid"
    assert not CheckResult.of([budget], {}).valid
