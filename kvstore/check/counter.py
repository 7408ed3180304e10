"""A counter under concurrent increments: did every increment count exactly once?

The workload the README's demo runs: clients ``incr`` one key by positive deltas; a retried
increment applied twice, or an acknowledged one lost, moves the counter off what was
acknowledged. The counter starts absent, which ``incr`` reads as 0; each ``ok`` incr returns
the value it produced.

What a correct store guarantees, and so what is checked (every rule is implied by
linearizability, so none can fire on a correct store):

* ``"under"`` / ``"over"``: the final value (read after every op returned) is at least the
  sum of the ``ok`` deltas (each took effect) and at least the highest value an ``ok`` incr
  returned (the counter never decreases); it is at most the ``ok`` deltas plus the ``unknown``
  ones (Jepsen's ``:info``: each took effect at most once, or not at all). ``fail`` ops count
  for nothing.
* ``"repeated-value"``: two ``ok`` increments returned the same value. With positive deltas
  each application leaves a strictly higher counter, so two applications never produce the
  same value; a duplicate answer means one increment was answered from the wrong result.
* ``"out-of-bounds"``: an ``ok`` incr returned a value outside what could hold at its
  linearization point. Below: its delta plus what the counter certainly held when it was
  invoked, the larger of two sound bounds: the sum of the deltas of the ``ok`` increments that
  had returned, and the highest value one of them returned. Above: the sum of the deltas of
  every increment (``ok`` or ``unknown``, itself included) invoked before it returned; any
  increment invoked later took effect later.

Clock ties are read as overlap (the permissive side) in both bounds.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Sequence
from itertools import accumulate
from typing import Final

from kvstore.check.history import HistoryError, Op, describe, require_kinds, returned_at, validate
from kvstore.check.verdict import CheckResult, Violation

UNDER: Final = "under"
OVER: Final = "over"
REPEATED_VALUE: Final = "repeated-value"
OUT_OF_BOUNDS: Final = "out-of-bounds"


def check_counter(ops: Sequence[Op], final_value: int) -> CheckResult:
    """Judges the incr ops on one counter, and ``final_value`` read after they all returned.

    Raises ``HistoryError`` on malformed input, ops on more than one key, or a delta that is
    not positive (the rules above need strictly increasing counters).
    """
    validate(ops)
    require_kinds(ops, ("incr",), "check_counter")
    keys = sorted({op.key for op in ops})
    if len(keys) > 1:
        raise HistoryError(f"check_counter judges one counter; the ops touch {keys}")
    for op in ops:
        if op.value <= 0:
            raise HistoryError(f"op #{op.index}: incr deltas must be positive, not {op.value}")
    key = keys[0] if keys else ""
    done = [op for op in ops if op.status == "ok"]
    maybe = [op for op in ops if op.status == "unknown"]
    violations = _final(key, final_value, done, maybe)
    violations += _repeated_values(key, done)
    violations += _out_of_bounds(key, done, done + maybe)
    stats = {"ok_ops": len(done), "unknown_ops": len(maybe),
             "fail_ops": len(ops) - len(done) - len(maybe), "final_value": final_value}
    return CheckResult.of(violations, stats)


def _final(key: str, final: int, done: list[Op], maybe: list[Op]) -> list[Violation]:
    acknowledged = sum(op.value for op in done)
    possible = sum(op.value for op in maybe)
    highest = max(done, key=lambda op: op.result, default=None)
    if final < acknowledged:
        return [Violation(UNDER, key, f"final value {final} < {acknowledged}, the sum of the "
                          f"{len(done)} acknowledged increments: some were lost")]
    if highest is not None and final < highest.result:
        return [Violation(UNDER, key, f"final value {final} < {highest.result}, returned by "
                          f"{describe(highest)}: the counter went down", [highest.index])]
    if final > acknowledged + possible:
        return [Violation(OVER, key, f"final value {final} > {acknowledged + possible}: the "
                          f"acknowledged increments sum to {acknowledged} and the unknown ones "
                          f"({len(maybe)}) to {possible}: some increment counted more than once")]
    return []


def _repeated_values(key: str, done: list[Op]) -> list[Violation]:
    by_value: dict[int, list[Op]] = defaultdict(list)
    for op in done:
        by_value[op.result].append(op)
    return [Violation(REPEATED_VALUE, key, f"{len(same)} acknowledged increments returned "
                      f"{value}: {', '.join(map(describe, same))}", [op.index for op in same])
            for value, same in sorted(by_value.items()) if len(same) > 1]


def _out_of_bounds(key: str, done: list[Op], applicable: list[Op]) -> list[Violation]:
    """Each ok incr's result against the bounds of the module docstring, in O(n log n)."""
    # Ok increments by return time, with running sums of their deltas and maxima of results.
    returned = sorted(done, key=returned_at)
    return_times = [returned_at(op) for op in returned]
    sums_before = [0, *accumulate(op.value for op in returned)]
    highest_before = [0, *accumulate((op.result for op in returned), max)]
    # Increments that may have taken effect, by call time, with running sums of their deltas.
    called = sorted(applicable, key=lambda op: op.call_ns)
    call_times = [op.call_ns for op in called]
    sums_called = [0, *accumulate(op.value for op in called)]
    violations = []
    for op in done:
        before = bisect_left(return_times, op.call_ns)  # returned strictly before op's call
        low = op.value + max(sums_before[before], highest_before[before])
        high = sums_called[bisect_right(call_times, returned_at(op))]  # called by its return
        if op.result < low:
            why = (f"at least {low}: the increments that returned before it was invoked had "
                   f"brought the counter to {low - op.value}")
        elif op.result > high:
            why = (f"at most {high}: the increments invoked before it returned, itself "
                   f"included, add up to {high}")
        else:
            continue
        violations.append(Violation(OUT_OF_BOUNDS, key, f"{describe(op)} cannot have returned "
                                    f"{op.result}: it must be {why}", [op.index]))
    return violations
