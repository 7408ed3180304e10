"""The checkers on generated histories of correct objects, and on the same histories corrupted.

``simulate`` runs clients against a correct, atomic object (a dict) with real interleavings: each
op takes effect at one instant of a fake clock, between its call and its return. Some ops fail
(never take effect); some end unknown: the client gives up, and the op takes effect before
that, after it (a proposal that commits late), or never. The clock sometimes stands still, so
unrelated events share a timestamp. A correct checker must call every such history valid (no
false alarms) and every corruption that no execution could explain invalid.

``check_register`` is also compared with ``linearizable_by_definition``, a search with none of
its reductions, on histories of up to three keys (checked key by key: linearizability is local),
random and damaged, about a quarter of them not linearizable: every reduction it makes is
claimed to change no verdict. Each kind of violation the checkers report is also planted in
generated histories: stale and never-written reads; lost, phantom, duplicate, out-of-order and
future list values; counters over and under, impossible and repeated increment answers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvstore.check.counter import OUT_OF_BOUNDS, REPEATED_VALUE, UNDER, check_counter
from kvstore.check.history import Op, by_key
from kvstore.check.linearizable import NONLINEARIZABLE, check_register
from kvstore.check.list_append import (
    DUPLICATE,
    FUTURE,
    LOST,
    ORDER,
    PHANTOM,
    check_list_append,
)

Request = tuple[str, str, Any]  # kind, key, value


@dataclass
class Object:
    """A correct object: ``request`` makes the next op, ``apply`` runs one atomically."""

    keys: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    written: int = 0

    def unique(self) -> str:
        self.written += 1
        return f"v{self.written}"


class Register(Object):
    def request(self, rng: random.Random) -> Request:
        key, roll = rng.choice(self.keys), rng.random()
        if roll < 0.45:
            return "get", key, None
        if roll < 0.8:
            return "put", key, self.unique()
        seen = [None] + [f"v{n}" for n in range(1, self.written + 1)]
        expected = self.data.get(key) if rng.random() < 0.5 else rng.choice(seen)
        return "cas", key, [expected, self.unique()]

    def apply(self, op: Op) -> Any:
        current = self.data.get(op.key)
        if op.kind == "get":
            return current
        if op.kind == "put":
            self.data[op.key] = op.value
            return None
        expected, new = op.value
        if current != expected:
            return False
        self.data[op.key] = new
        return True


class ListAppend(Object):
    def request(self, rng: random.Random) -> Request:
        key = rng.choice(self.keys)
        return ("read", key, None) if rng.random() < 0.4 else ("append", key, self.unique())

    def apply(self, op: Op) -> Any:
        items = self.data.setdefault(op.key, [])
        if op.kind == "read":
            return list(items)
        items.append(op.value)
        return None


class Counter(Object):
    def request(self, rng: random.Random) -> Request:
        return "incr", self.keys[0], rng.randint(1, 3)

    def apply(self, op: Op) -> Any:
        self.data[op.key] = self.data.get(op.key, 0) + op.value
        return self.data[op.key]


@dataclass
class _Client:
    op: Op | None = None  # the op in flight
    fate: str = "ok"      # how it will end
    applied: bool = False
    result: Any = None


def simulate(obj: Object, rng: random.Random, processes: int, n_ops: int,
             p_fail: float = 0.1, p_unknown: float = 0.1) -> list[Op]:
    """A history of ``n_ops`` ops by ``processes`` clients against ``obj``, interleaved by
    ``rng``."""
    clients = [_Client() for _ in range(processes)]
    zombies: list[Op] = []  # unknown ops the client gave up on, that may still take effect
    ops: list[Op] = []
    now = 0
    while len(ops) < n_ops or any(c.op for c in clients):
        now += rng.choice((0, 1, 1, 1))
        actions: list[Callable[[], None]] = []
        for process, client in enumerate(clients):
            if client.op is None and len(ops) < n_ops:
                actions.append(lambda p=process, c=client, t=now: _invoke(
                    obj, rng, c, p, ops, t, p_fail, p_unknown))
            elif client.op is not None:
                actions.append(lambda c=client, t=now: _advance(obj, rng, c, zombies, t))
        actions += [lambda z=z: (obj.apply(z), zombies.remove(z)) for z in zombies]
        rng.choice(actions)()
    return ops


def _invoke(obj: Object, rng: random.Random, client: _Client, process: int, ops: list[Op],
            now: int, p_fail: float, p_unknown: float) -> None:
    kind, key, value = obj.request(rng)
    client.op = Op(len(ops), process, kind, key, value, now, None, "unknown", None)
    roll = rng.random()
    client.fate = "fail" if roll < p_fail else "unknown" if roll < p_fail + p_unknown else "ok"
    client.applied = False
    ops.append(client.op)


def _advance(obj: Object, rng: random.Random, client: _Client, zombies: list[Op], now: int) -> None:
    """One step of the op in flight: take effect, or end (ok / fail / give up)."""
    op = client.op
    assert op is not None
    if client.fate != "fail" and not client.applied and (client.fate == "ok" or rng.random() < 0.4):
        client.result, client.applied = obj.apply(op), True
        return
    op.return_ns = now
    op.status = client.fate
    if client.fate == "ok":
        op.result = client.result
    elif client.fate == "unknown" and not client.applied and rng.random() < 0.5:
        zombies.append(op)  # may still take effect, after the client gave up
    client.op = None


# --- registers ---------------------------------------------------------------------------------

histories = dict(rng=st.randoms(use_true_random=False), processes=st.integers(1, 5),
                 n_ops=st.integers(1, 40))
longer_histories = {**histories, "n_ops": st.integers(6, 40)}


@settings(max_examples=150, deadline=None)
@given(**histories)
def test_a_correct_register_is_linearizable(rng: random.Random, processes: int, n_ops: int) -> None:
    ops = simulate(Register(["x", "y"]), rng, processes, n_ops)
    result = check_register(ops)
    assert result.valid, result.violations


@settings(max_examples=100, deadline=None)
@given(**longer_histories)
def test_a_read_of_a_value_never_written_is_not_linearizable(
        rng: random.Random, processes: int, n_ops: int) -> None:
    ops = simulate(Register(["x", "y"]), rng, processes, n_ops)
    gets = [op for op in ops if op.kind == "get" and op.status == "ok"]
    assume(gets)
    corrupted = rng.choice(gets)
    corrupted.result = "never written"
    result = check_register(ops)
    assert result.outcome == "invalid"
    assert [(v.kind, v.key) for v in result.violations] == [(NONLINEARIZABLE, corrupted.key)]


class TinyRegister(Register):
    """Half its writes use the values "a" and "b": a value has many writers."""

    def unique(self) -> str:
        self.written += 1
        return f"v{self.written}" if self.written % 2 else random.Random(self.written).choice("ab")


def linearizable_by_definition(ops: list[Op]) -> bool:
    """Whether some order of the ops that may have taken effect explains every ok one.

    No reduction: every op that real time allows next is tried, from every (placed set, value)
    once. Failed ops are left out; unknown ops may be placed or not, with any output.
    """
    ops = [op for op in ops if op.status != "fail"]
    ok = frozenset(i for i, op in enumerate(ops) if op.status == "ok")

    def step(value: str | None, op: Op) -> tuple[bool, str | None]:
        if op.kind == "put":
            return True, op.value
        if op.kind == "get":
            return op.status != "ok" or op.result == value, value
        expected, new = op.value
        swapped = value == expected
        return op.status != "ok" or op.result == swapped, new if swapped else value

    @cache
    def completes(placed: frozenset[int], value: str | None) -> bool:
        if ok <= placed:
            return True
        for i, op in enumerate(ops):
            must_wait = any(j not in placed and ops[j].return_ns < op.call_ns for j in ok)
            if i not in placed and not must_wait:
                legal, after = step(value, op)
                if legal and completes(placed | {i}, after):
                    return True
        return False

    return completes(frozenset(), None)


def linearizable_by_definition_per_key(ops: list[Op]) -> bool:
    """Linearizability is local (Herlihy & Wing 1990): a history of several registers is
    linearizable exactly when each register's own history is."""
    return all(linearizable_by_definition(key_ops) for key_ops in by_key(ops).values())


def damage(ops: list[Op], rng: random.Random) -> None:
    """Changes one op a little: a read's result (often to a value the key held earlier: a stale
    read), a cas's answer, or a status between fail and unknown."""
    op = rng.choice(ops)
    if op.status == "ok" and op.kind == "get":
        written = [o.value if o.kind == "put" else o.value[1]
                   for o in ops if o.key == op.key and o.kind in ("put", "cas")]
        op.result = rng.choice([None, "a", "b", *written])
    elif op.status == "ok" and op.kind == "cas":
        op.result = not op.result
    elif op.status == "unknown":
        op.status = "fail"
    elif op.kind != "get":
        op.status = "unknown"


ORACLE_KEYS = ("x", "y", "z")
ORACLE_OPS_PER_KEY = 12
"""The brute-force oracle is exponential in the ops of one key: keep each key's history small,
and make the whole history long by using several keys."""


def oracle_history(rng: random.Random) -> list[Op]:
    """A history for the oracle comparison: 1-3 keys, up to 5 processes, up to 36 ops; often
    damaged once or more, so that a good share are not linearizable
    (``test_the_oracle_comparison_sees_both_verdicts`` holds it to that)."""
    keys = list(ORACLE_KEYS[:rng.randint(1, len(ORACLE_KEYS))])
    register = (TinyRegister if rng.random() < 0.5 else Register)(keys)
    ops = simulate(register, rng, rng.randint(1, 5), rng.randint(1, ORACLE_OPS_PER_KEY * len(keys)),
                   p_fail=0.15, p_unknown=0.3)
    if rng.random() < 0.7:
        for _ in range(rng.randint(1, 3)):
            damage(ops, rng)
    return ops


@settings(max_examples=400, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_check_register_agrees_with_the_definition(rng: random.Random) -> None:
    ops = oracle_history(rng)
    assert check_register(ops).valid == linearizable_by_definition_per_key(ops)


def test_the_oracle_comparison_sees_both_verdicts() -> None:
    """The comparison above proves little if nearly every history is valid: over 300 fixed
    seeds, between a quarter and three quarters must be non-linearizable."""
    verdicts = [linearizable_by_definition_per_key(oracle_history(random.Random(seed)))
                for seed in range(300)]
    share = verdicts.count(False) / len(verdicts)
    assert 0.25 <= share <= 0.75, share


def _writes_before(ops: list[Op], get: Op) -> list[Op]:
    """The ok writes of ``get``'s key that returned before ``get`` was invoked."""
    return [o for o in ops if o.key == get.key and o.status == "ok" and o.kind == "put"
            and o.return_ns < get.call_ns]


@settings(max_examples=60, deadline=None)
@given(**longer_histories)
def test_a_stale_read_is_not_linearizable(rng: random.Random, processes: int, n_ops: int) -> None:
    """A read returning a value that was certainly overwritten before it was invoked: put A
    returned, then put B was invoked and returned, then the read began; it cannot see A."""
    ops = simulate(Register(["x", "y"]), rng, processes, n_ops)
    candidates = []
    for get in (op for op in ops if op.kind == "get" and op.status == "ok"):
        before = _writes_before(ops, get)
        candidates += [(get, old) for old in before
                       if any(new.call_ns > old.return_ns for new in before)]
    assume(candidates)
    get, old = rng.choice(candidates)
    get.result = old.value
    result = check_register(ops)
    assert result.outcome == "invalid"
    assert (NONLINEARIZABLE, get.key) in [(v.kind, v.key) for v in result.violations]


# --- list-append -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(**histories)
def test_a_correct_list_store_passes_list_append(rng: random.Random, processes: int,
                                                 n_ops: int) -> None:
    ops = simulate(ListAppend(["a", "b"]), rng, processes, n_ops)
    result = check_list_append(ops)
    assert result.valid, result.violations


def _nonempty_reads(ops: list[Op]) -> list[Op]:
    return [op for op in ops if op.kind == "read" and op.status == "ok" and op.result]


@settings(max_examples=60, deadline=None)
@given(**longer_histories)
def test_a_read_value_never_appended_is_a_phantom(rng: random.Random, processes: int,
                                                  n_ops: int) -> None:
    ops = simulate(ListAppend(["a", "b"]), rng, processes, n_ops)
    reads = _nonempty_reads(ops)
    assume(reads)
    read = rng.choice(reads)
    read.result[rng.randrange(len(read.result))] = "never appended"
    assert PHANTOM in {v.kind for v in check_list_append(ops).violations}


@settings(max_examples=60, deadline=None)
@given(**longer_histories)
def test_a_value_read_twice_is_a_duplicate(rng: random.Random, processes: int,
                                           n_ops: int) -> None:
    ops = simulate(ListAppend(["a", "b"]), rng, processes, n_ops)
    reads = _nonempty_reads(ops)
    assume(reads)
    read = rng.choice(reads)
    read.result.append(rng.choice(read.result))
    assert DUPLICATE in {v.kind for v in check_list_append(ops).violations}


many_ops = {**histories, "n_ops": st.integers(20, 60)}


@settings(max_examples=60, deadline=None)
@given(**longer_histories)
def test_a_read_missing_an_acknowledged_append_is_lost(rng: random.Random, processes: int,
                                                       n_ops: int) -> None:
    """A read invoked after an append of value v returned ok, and without v."""
    ops = simulate(ListAppend(["a", "b"]), rng, processes, n_ops)
    candidates = [(read, append) for read in _nonempty_reads(ops) for append in ops
                  if append.kind == "append" and append.status == "ok" and append.key == read.key
                  and append.return_ns < read.call_ns and append.value in read.result]
    assume(candidates)
    read, append = rng.choice(candidates)
    read.result.remove(append.value)
    assert LOST in {v.kind for v in check_list_append(ops).violations}


@settings(max_examples=60, deadline=None)
@given(**many_ops)
def test_two_reads_in_different_orders_are_an_order_violation(rng: random.Random,
                                                              processes: int, n_ops: int) -> None:
    """Two reads of one key that agree on their first two values; one of them is made to hold
    those two the other way round: no single list has both as prefixes."""
    ops = simulate(ListAppend(["a", "b"]), rng, processes, n_ops)
    reads = [r for r in _nonempty_reads(ops) if len(r.result) >= 2]
    pairs = [(r, other) for r in reads for other in reads
             if other is not r and other.key == r.key and other.result[:2] == r.result[:2]]
    assume(pairs)
    read, _ = rng.choice(pairs)
    read.result[0], read.result[1] = read.result[1], read.result[0]
    assert ORDER in {v.kind for v in check_list_append(ops).violations}


@settings(max_examples=60, deadline=None)
@given(**longer_histories)
def test_a_read_of_an_append_invoked_after_it_returned_is_from_the_future(
        rng: random.Random, processes: int, n_ops: int) -> None:
    ops = simulate(ListAppend(["a", "b"]), rng, processes, n_ops)
    candidates = [(read, append) for read in ops if read.kind == "read" and read.status == "ok"
                  for append in ops if append.kind == "append" and append.status != "fail"
                  and append.key == read.key and append.call_ns > read.return_ns]
    assume(candidates)
    read, append = rng.choice(candidates)
    read.result.append(append.value)
    assert FUTURE in {v.kind for v in check_list_append(ops).violations}


# --- counter -----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(**histories)
def test_a_correct_counter_is_within_every_bound(rng: random.Random, processes: int,
                                                 n_ops: int) -> None:
    counter = Counter(["c"])
    ops = simulate(counter, rng, processes, n_ops)
    result = check_counter(ops, counter.data.get("c", 0))
    assert result.valid, result.violations


@settings(max_examples=50, deadline=None)
@given(**histories)
def test_a_counter_beyond_every_increment_is_over(rng: random.Random, processes: int,
                                                  n_ops: int) -> None:
    ops = simulate(Counter(["c"]), rng, processes, n_ops)
    everything = sum(op.value for op in ops if op.status != "fail")
    assert "over" in {v.kind for v in check_counter(ops, everything + 1).violations}


def _ok_incrs(ops: list[Op]) -> list[Op]:
    return [op for op in ops if op.kind == "incr" and op.status == "ok"]


@settings(max_examples=50, deadline=None)
@given(**histories)
def test_a_counter_short_of_its_acknowledged_increments_is_under(
        rng: random.Random, processes: int, n_ops: int) -> None:
    """An acknowledged increment lost: the final value below the sum of the ok deltas."""
    ops = simulate(Counter(["c"]), rng, processes, n_ops)
    acknowledged = sum(op.value for op in _ok_incrs(ops))
    assume(acknowledged > 0)
    assert UNDER in {v.kind for v in check_counter(ops, acknowledged - 1).violations}


@settings(max_examples=60, deadline=None)
@given(**histories, above=st.booleans())
def test_an_impossible_answer_to_an_increment_is_out_of_bounds(
        rng: random.Random, processes: int, n_ops: int, above: bool) -> None:
    """An ok incr answered with more than every increment of the history adds up to, or with
    less than its own delta (the counter starts at 0 and only grows)."""
    counter = Counter(["c"])
    ops = simulate(counter, rng, processes, n_ops)
    done = _ok_incrs(ops)
    assume(done)
    op = rng.choice(done)
    everything = sum(o.value for o in ops if o.status != "fail")
    op.result = everything + 1 if above else op.value - 1
    final = max(counter.data.get("c", 0), op.result)
    assert OUT_OF_BOUNDS in {v.kind for v in check_counter(ops, final).violations}


@settings(max_examples=50, deadline=None)
@given(**longer_histories)
def test_two_increments_answered_alike_are_a_repeated_value(
        rng: random.Random, processes: int, n_ops: int) -> None:
    """One increment answered with another's result (a retry answered from the wrong cache)."""
    counter = Counter(["c"])
    ops = simulate(counter, rng, processes, n_ops)
    done = _ok_incrs(ops)
    assume(len(done) >= 2)
    first, second = rng.sample(done, 2)
    second.result = first.result
    kinds = {v.kind for v in check_counter(ops, counter.data["c"]).violations}
    assert REPEATED_VALUE in kinds


# --- performance -------------------------------------------------------------------------------


def _timed(check: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = check()
    return result, time.perf_counter() - started


@pytest.mark.parametrize("p_unknown", [0.0, 0.05])
def test_a_2000_op_register_history_checks_quickly(p_unknown: float) -> None:
    ops = simulate(Register([f"k{i}" for i in range(5)]), random.Random(7), 10, 2000,
                   p_fail=0.05, p_unknown=p_unknown)
    result, seconds = _timed(lambda: check_register(ops))
    print(f"\ncheck_register, 2000 ops, 10 processes, 5 keys, {p_unknown:.0%} unknown: "
          f"valid in {seconds:.3f} s, {result.stats['steps']:,} steps")
    assert result.valid, result.violations

    gets = [op for op in ops if op.kind == "get" and op.status == "ok"]
    random.Random(1).choice(gets).result = "never written"
    result, seconds = _timed(lambda: check_register(ops))
    print(f"  ... one read corrupted: {result.outcome} in {seconds:.3f} s, "
          f"{result.stats['steps']:,} steps")
    assert result.outcome == "invalid"
    assert seconds < 10  # a generous ceiling: the search must not blow up on a violation


def test_a_2000_op_list_append_history_checks_quickly() -> None:
    ops = simulate(ListAppend([f"k{i}" for i in range(5)]), random.Random(7), 10, 2000,
                   p_fail=0.05, p_unknown=0.05)
    result, seconds = _timed(lambda: check_list_append(ops))
    print(f"\ncheck_list_append, 2000 ops, 10 processes, 5 keys: valid in {seconds:.3f} s")
    assert result.valid, result.violations
    assert seconds < 10  # a generous ceiling: the rules are O(n log n) per key, not quadratic

    read = max(_nonempty_reads(ops), key=lambda op: len(op.result))
    read.result.append(read.result[0])
    result, seconds = _timed(lambda: check_list_append(ops))
    print(f"  ... one read corrupted: {result.outcome} in {seconds:.3f} s")
    assert DUPLICATE in {v.kind for v in result.violations}
    assert seconds < 10
