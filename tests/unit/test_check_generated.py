"""The checkers on generated histories of correct objects, and on the same histories corrupted.

``simulate`` runs clients against a correct, atomic object (a dict) with real interleavings: each
op takes effect at one instant of a fake clock, between its call and its return. Some ops fail
(never take effect); some end unknown: the client gives up, and the op takes effect before
that, after it (a proposal that commits late), or never. The clock sometimes stands still, so
unrelated events share a timestamp. A correct checker must call every such history valid (no
false alarms) and every corruption that no execution could explain invalid.

``check_register`` is also compared with ``linearizable_by_definition``, a search with none of
its reductions, on small histories both random and slightly damaged: every reduction it makes
is claimed to change no verdict.
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

from kvstore.check.counter import check_counter
from kvstore.check.history import Op
from kvstore.check.linearizable import NONLINEARIZABLE, check_register
from kvstore.check.list_append import DUPLICATE, PHANTOM, check_list_append

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


def damage(ops: list[Op], rng: random.Random) -> None:
    """Changes one op a little: a result, or a status between fail and unknown."""
    op = rng.choice(ops)
    if op.status == "ok" and op.kind == "get":
        op.result = rng.choice([None, "a", "b", "v1", "v3", "v5"])
    elif op.status == "ok" and op.kind == "cas":
        op.result = not op.result
    elif op.status == "unknown":
        op.status = "fail"
    elif op.kind != "get":
        op.status = "unknown"


@settings(max_examples=400, deadline=None)
@given(rng=st.randoms(use_true_random=False), processes=st.integers(1, 4),
       n_ops=st.integers(1, 10), tiny=st.booleans(), damaged=st.booleans())
def test_check_register_agrees_with_the_definition(rng: random.Random, processes: int,
                                                    n_ops: int, tiny: bool, damaged: bool) -> None:
    ops = simulate((TinyRegister if tiny else Register)(["x"]), rng, processes, n_ops,
                   p_fail=0.15, p_unknown=0.3)
    if damaged:
        damage(ops, rng)
    assert check_register(ops).valid == linearizable_by_definition(ops)


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
