"""List-append: appends of unique values to keys, and reads of whole lists.

This is the workload Jepsen's Elle (Kingsbury & Alvaro 2020) is built on, reduced to what a
single-key store can show. Its strength is that every value names the one op that appended it,
so each read is a record of exactly which appends took effect, and in which order. A retry
applied twice, the failure exactly-once sessions exist to prevent, shows up as a value read
twice; with a counter or a register it would be invisible or ambiguous.

Each rule below holds in every history of a correct store (lists only grow, each append takes
effect at most once, between its call and -- for an ``ok`` one -- its return; an ``unknown``
append may take effect at any time after its call, or never), so a violation is never a false
alarm. Each violation names the value, the append that wrote it and up to five reads.

* ``"duplicate"``: a value appears twice in one read.
* ``"phantom"``: a read holds a value no op appended to the key, or one appended only by an op
  that certainly failed.
* ``"future"``: a read holds a value whose append was invoked after the read returned.
* ``"lost"``: a read invoked after a value was certainly in the list lacks it. A value is
  certainly in by the return of its ``ok`` append, or by the return of any read that held it.
  A final read made after the run, when every op has returned, is an ordinary read here: it
  must hold every acknowledged append.
* ``"order"``: two reads are not prefixes of one list (reads in a correct store are all
  prefixes of the key's final list).

Reads with status ``fail`` or ``unknown`` carry no result and are ignored. The values appended
to a key must be unique (``HistoryError`` otherwise): a reused value would make a read
ambiguous.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from typing import Final

from kvstore.check.history import (
    HistoryError,
    Op,
    by_key,
    completion_time,
    describe,
    require_kinds,
    returned_at,
    validate,
)
from kvstore.check.verdict import CheckResult, Violation

LIST_APPEND_KINDS: Final = ("append", "read")
DUPLICATE: Final = "duplicate"
PHANTOM: Final = "phantom"
FUTURE: Final = "future"
LOST: Final = "lost"
ORDER: Final = "order"

_SHOWN: Final = 5
"""How many reads a violation names at most (the message gives the full count)."""


def check_list_append(ops: Sequence[Op]) -> CheckResult:
    """Judges a history of append and read ops by the five rules of this module.

    Raises ``HistoryError`` on malformed input or a value appended twice to one key.
    """
    validate(ops)
    require_kinds(ops, LIST_APPEND_KINDS, "check_list_append")
    violations: list[Violation] = []
    stats = {"keys": 0, "appends": 0, "reads": 0}
    for key, key_ops in by_key(ops).items():
        appends = _appends_by_value(key, key_ops)
        reads = [op for op in key_ops if op.kind == "read" and op.status == "ok"]
        stats["keys"] += 1
        stats["appends"] += len(appends)
        stats["reads"] += len(reads)
        for rule in (_duplicates, _phantoms, _future, _lost, _order):
            violations += rule(key, appends, reads)
    return CheckResult.of(violations, stats)


def _appends_by_value(key: str, ops: list[Op]) -> dict[str, Op]:
    appends: dict[str, Op] = {}
    for op in ops:
        if op.kind == "append":
            if op.value in appends:
                raise HistoryError(f"{op.value!r} is appended to {key!r} twice (ops "
                                   f"#{appends[op.value].index} and #{op.index}); values must "
                                   "be unique")
            appends[op.value] = op
    return appends


def _applicable(value: str, appends: dict[str, Op]) -> Op | None:
    """The append of ``value`` if it may have taken effect (it did not fail), else None."""
    append = appends.get(value)
    return append if append is not None and append.status != "fail" else None


def _violation(kind: str, key: str, message: str, culprit: Op | None, reads: list[Op]) -> Violation:
    """A violation naming ``culprit`` (the append, or a read, at fault) and the first reads."""
    shown = ([culprit] if culprit is not None else []) + reads[:_SHOWN]
    return Violation(kind, key, message, [op.index for op in shown])


def _first_reads(reads: list[Op]) -> str:
    more = f" (and {len(reads) - 1} more)" if len(reads) > 1 else ""
    return f"{describe(reads[0])}{more}"


def _duplicates(key: str, appends: dict[str, Op], reads: list[Op]) -> list[Violation]:
    """A value twice in one read: its append took effect twice (say, a retry applied again).

    Sound because each value is appended by one op, and an op takes effect at most once.
    """
    found: dict[str, list[Op]] = {}
    for read in reads:
        for value, count in Counter(read.result).items():
            if count > 1:
                found.setdefault(value, []).append(read)
    return [_violation(DUPLICATE, key, f"{value!r} appears more than once in a read: "
                       f"{_first_reads(rs)}", appends.get(value), rs)
            for value, rs in found.items()]


def _phantoms(key: str, appends: dict[str, Op], reads: list[Op]) -> list[Violation]:
    """Values that no op could have appended: read, but appended only by an op that certainly
    took no effect (Jepsen's ``:fail``; one violation per value, naming that op), or never
    appended to this key at all (one violation for all of them)."""
    failed: dict[str, list[Op]] = {}
    never: dict[str, None] = {}  # an ordered set
    never_reads: list[Op] = []
    for read in reads:
        phantoms = [v for v in dict.fromkeys(read.result) if _applicable(v, appends) is None]
        for value in phantoms:
            if value in appends:
                failed.setdefault(value, []).append(read)
            else:
                never[value] = None
        if any(value not in appends for value in phantoms):
            never_reads.append(read)
    violations = [_violation(PHANTOM, key, f"{value!r} is read but appended only by "
                             f"{describe(appends[value])}: {_first_reads(rs)}", appends[value], rs)
                  for value, rs in failed.items()]
    if never:
        values = list(never)
        shown = ", ".join(map(repr, values[:_SHOWN])) + (", ..." if len(values) > _SHOWN else "")
        violations.append(_violation(PHANTOM, key, f"{_count(len(values), 'value')} read but never "
                                     f"appended to this key ({shown}): {_first_reads(never_reads)}",
                                     None, never_reads))
    return violations


def _future(key: str, appends: dict[str, Op], reads: list[Op]) -> list[Violation]:
    """A read that returned before the append of a value it holds was invoked.

    Sound because an op takes effect after its call, and a read shows the list at a moment
    before its return. (Equal times are not a violation: a clock tie is read as overlap.)
    """
    found: dict[str, list[Op]] = {}
    for read in reads:
        for value in dict.fromkeys(read.result):
            append = _applicable(value, appends)
            if append is not None and append.call_ns > returned_at(read):
                found.setdefault(value, []).append(read)
    return [_violation(FUTURE, key, f"{value!r} is read before {describe(appends[value])} "
                       f"was invoked: {_first_reads(rs)}", appends[value], rs)
            for value, rs in found.items()]


def _lost(key: str, appends: dict[str, Op], reads: list[Op]) -> list[Violation]:
    """A read invoked after a value was certainly in the list, that does not hold it.

    A value is certainly in the list from the return of its ``ok`` append, and from the return
    of any read that held it (that read saw it before returning). Lists only grow, and a read
    invoked later shows the list at a later moment, so it must hold the value.
    """
    by_call = sorted(reads, key=lambda r: (r.call_ns, r.index))
    calls = [r.call_ns for r in by_call]
    held = {r.index: set(r.result) for r in reads}
    violations = []
    for value, (since, proof) in _certain(appends, reads).items():
        later = by_call[bisect_right(calls, since):]
        missing = [r for r in later if value not in held[r.index]]
        if missing:
            how = ("acknowledged by" if proof.kind == "append" else "seen by")
            message = (f"{value!r}, {how} {describe(proof)}, is missing from "
                       f"{_count(len(missing), 'read')} invoked after that returned: "
                       f"{_first_reads(missing)}")
            violations.append(_violation(LOST, key, message, proof, missing))
    return violations


def _certain(appends: dict[str, Op], reads: list[Op]) -> dict[str, tuple[float, Op]]:
    """For each value that may have been appended: the earliest time it was certainly in the
    list, and the op that proves it (its ok append, or a read holding it)."""
    certain: dict[str, tuple[float, Op]] = {}
    for value, append in appends.items():
        if append.status == "ok":
            certain[value] = (completion_time(append), append)
    for read in reads:
        seen_at = completion_time(read)
        for value in read.result:
            if _applicable(value, appends) is None:
                continue  # a phantom: reported as such
            if value not in certain or seen_at < certain[value][0]:
                certain[value] = (seen_at, read)
    return certain


def _order(key: str, appends: dict[str, Op], reads: list[Op]) -> list[Violation]:
    """Two reads that are not prefixes of one list.

    In a correct store every read is a prefix of the key's final list. Sorted by length, the
    reads are all prefixes of the longest exactly when each is a prefix of the next (prefix is
    transitive), so comparing neighbours finds every break, and one odd read shows up as one
    or two pairs rather than one per other read.
    """
    by_length = sorted(reads, key=lambda r: (len(r.result), r.index))
    violations = []
    for shorter, longer in pairwise(by_length):
        common = _common_prefix(shorter.result, longer.result)
        if common < len(shorter.result):
            message = (f"#{shorter.index} read and #{longer.index} read are not prefixes of one "
                       f"list: after {_count(common, 'common value')} they hold "
                       f"{shorter.result[common]!r} and {longer.result[common]!r}")
            violations.append(_violation(ORDER, key, message, None, [shorter, longer]))
    return violations


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
