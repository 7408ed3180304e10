"""The history of a test run: what each client asked, when, and what came of it.

A history is a list of ``Op``: one per operation a client (a "process") ran, with the interval
of real time in which it ran and how it ended. The three endings are Jepsen's:

* ``"ok"`` (Jepsen's ``:ok``): the client got an answer; the op took effect exactly once,
  somewhere between ``call_ns`` and ``return_ns``, and ``result`` is what it returned.
* ``"fail"`` (``:fail``): the op certainly took no effect, ever (refused, or a read that
  changes nothing anyway). Checkers drop it, except to recognise its value if it shows up.
* ``"unknown"`` (``:info``): the client gave up without knowing. The op may have taken effect
  or not, and if it did, at any moment after ``call_ns`` -- including after ``return_ns``,
  which only records when the client stopped waiting (a proposal still in a Raft log can
  commit much later). Checkers therefore treat its completion time as +infinity and its
  result as unknown.

Times come from ``time.monotonic_ns()`` on one host, so they are comparable across processes.
The ``Recorder`` reads the clock *before* the request leaves and *after* the answer arrives:
each recorded interval contains the real one, which can only make checkers more permissive,
never report a violation that did not happen.

Checkers read clocks never; only ``Recorder`` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

KINDS = ("put", "get", "cas", "append", "read", "incr")
STATUSES = ("ok", "fail", "unknown")


class HistoryError(ValueError):
    """The history is malformed: a checker cannot judge it (a harness bug, not a store bug)."""


@dataclass
class Op:
    index: int
    """Position in the history; unique."""
    process: int
    """The client (worker) that ran it; a process runs one op at a time."""
    kind: str
    """``"put" | "get" | "cas" | "append" | "read" | "incr"``"""
    key: str
    value: Any
    """put: the value written (str); cas: ``[expected: str | None, new: str]``; append: the
    str appended; incr: the int delta; get and read: None."""
    call_ns: int
    """``time.monotonic_ns()`` at invocation."""
    return_ns: int | None
    """At completion; for ``"unknown"``, when the client gave up (None if it never did)."""
    status: str
    """``"ok" | "fail" | "unknown"``, see the module docstring."""
    result: Any
    """get: str | None (None: the key is absent); read: list[str] ([] if absent); cas: bool,
    whether it swapped; incr: int, the new value; put and append: None (ignored)."""


History: TypeAlias = list[Op]


def completion_time(op: Op) -> float:
    """The time by which ``op``'s effect, if it has one, has certainly happened.

    For an ``ok`` op that is ``return_ns``: the answer proves the effect. For ``fail`` and
    ``unknown`` ops, +infinity: a failed op never takes effect, and an unknown one may still
    take effect at any later moment. Real-time order ("a happened before b") holds exactly
    when ``completion_time(a) < b.call_ns``.
    """
    if op.status == "ok" and op.return_ns is not None:
        return op.return_ns
    return math.inf


def returned_at(op: Op) -> int:
    """``op.return_ns`` for an op that completed (``ok`` or ``fail``: ``validate`` checked it)."""
    if op.return_ns is None:
        raise HistoryError(f"op #{op.index}: a {op.status} op needs its return time")
    return op.return_ns


def describe(op: Op) -> str:
    """A short human reading of ``op`` for violation messages, e.g. ``#7 get -> 'a' (p3)``."""
    if op.kind == "get":
        what = f"get -> {op.result!r}" if op.status == "ok" else "get"
    elif op.kind == "read":
        what = f"read -> {_abbreviated(op.result)}" if op.status == "ok" else "read"
    elif op.kind == "cas":
        expected, new = op.value
        what = f"cas {expected!r}->{new!r}"
        if op.status == "ok":
            what += f" = {op.result!r}"
    elif op.kind == "incr":
        what = f"incr +{op.value}" + (f" -> {op.result!r}" if op.status == "ok" else "")
    else:
        what = f"{op.kind} {op.value!r}"
    status = "" if op.status == "ok" else f", {op.status}"
    return f"#{op.index} {what} (p{op.process}{status})"


def _abbreviated(values: Sequence[str]) -> str:
    """A list for a message: in full when short, else its ends and its length."""
    if len(values) <= 6:
        return repr(list(values))
    head, tail = ", ".join(map(repr, values[:2])), ", ".join(map(repr, values[-2:]))
    return f"[{head}, ..., {tail}] ({len(values)} values)"


# --- validation --------------------------------------------------------------------------------


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_optional_str(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _is_cas_value(x: Any) -> bool:
    return (isinstance(x, (list, tuple)) and len(x) == 2
            and _is_optional_str(x[0]) and isinstance(x[1], str))


def _is_str_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(v, str) for v in x)


def _anything(x: Any) -> bool:
    return True


# For each kind: (what its value must be, what the result of an ok op must be).
_SHAPES: dict[str, tuple[Callable[[Any], bool], Callable[[Any], bool]]] = {
    "put": (_is_str, _anything),
    "get": (lambda x: x is None, _is_optional_str),
    "cas": (_is_cas_value, lambda x: isinstance(x, bool)),
    "append": (_is_str, _anything),
    "read": (lambda x: x is None, _is_str_list),
    "incr": (_is_int, _is_int),
}


def validate_value(kind: str, value: Any) -> None:
    """Raises ``HistoryError`` unless ``kind`` is known and ``value`` has its shape."""
    if kind not in _SHAPES:
        raise HistoryError(f"unknown op kind {kind!r} (expected one of {', '.join(KINDS)})")
    if not _SHAPES[kind][0](value):
        raise HistoryError(f"a {kind} op cannot have the value {value!r}")


def validate(ops: Iterable[Op]) -> None:
    """Raises ``HistoryError`` at the first op a checker could not interpret.

    Checked: known kind and status, unique indexes, the value's shape, the result's shape for
    ``ok`` ops (an ok get or read without a usable result cannot be judged), and a return time
    for every op that completed (``ok`` and ``fail``), not before its call.
    """
    seen: set[int] = set()
    for op in ops:
        if op.index in seen:
            raise HistoryError(f"two ops have the index {op.index}")
        seen.add(op.index)
        _validate_op(op)


def _validate_op(op: Op) -> None:
    where = f"op #{op.index}"
    if op.status not in STATUSES:
        raise HistoryError(f"{where}: unknown status {op.status!r}")
    if not isinstance(op.key, str):
        raise HistoryError(f"{where}: the key must be a str, not {op.key!r}")
    try:
        validate_value(op.kind, op.value)
    except HistoryError as e:
        raise HistoryError(f"{where}: {e}") from None
    if op.status == "ok" and not _SHAPES[op.kind][1](op.result):
        raise HistoryError(f"{where}: an ok {op.kind} cannot have the result {op.result!r}")
    if op.return_ns is None:
        if op.status != "unknown":
            raise HistoryError(f"{where}: a {op.status} op needs its return time")
    elif op.return_ns < op.call_ns:
        raise HistoryError(f"{where}: returned ({op.return_ns}) before it was called "
                           f"({op.call_ns})")


def require_kinds(ops: Iterable[Op], kinds: Sequence[str], checker: str) -> None:
    """Raises ``HistoryError`` if an op is not of ``kinds``: each checker judges one model."""
    for op in ops:
        if op.kind not in kinds:
            raise HistoryError(f"{checker} judges {'/'.join(kinds)} ops; op #{op.index} is a "
                               f"{op.kind!r} (filter the history by key or kind first)")


# --- filtering ---------------------------------------------------------------------------------


def for_key(ops: Iterable[Op], key: str) -> list[Op]:
    """The ops on ``key``, in their order in ``ops``."""
    return [op for op in ops if op.key == key]


def by_key(ops: Iterable[Op]) -> dict[str, list[Op]]:
    """The ops grouped by key (keys sorted), each group in its order in ``ops``."""
    groups: dict[str, list[Op]] = {}
    for op in ops:
        groups.setdefault(op.key, []).append(op)
    return dict(sorted(groups.items()))


# --- files -------------------------------------------------------------------------------------

_FIELDS = tuple(f.name for f in dataclasses.fields(Op))


def dump(ops: Iterable[Op], path: str | os.PathLike[str]) -> None:
    """Writes ``ops`` to ``path`` as JSON lines: one object per op, with ``Op``'s field names."""
    with open(path, "w", encoding="utf-8") as f:
        for op in ops:
            # Field by field: dataclasses.asdict deep-copies every value, which takes minutes
            # for a long run whose reads return whole lists.
            f.write(json.dumps({name: getattr(op, name) for name in _FIELDS},
                               ensure_ascii=False) + "\n")


def load(path: str | os.PathLike[str]) -> list[Op]:
    """Reads a history written by ``dump`` (blank lines are skipped).

    Only the structure is checked here; the checkers ``validate`` the contents, so a damaged
    history can still be loaded and looked at.
    """
    ops = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                ops.append(_op_from_json(line, f"{path}:{number}"))
    return ops


def _op_from_json(line: str, where: str) -> Op:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as e:
        raise HistoryError(f"{where}: not JSON ({e})") from None
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        raise HistoryError(f"{where}: expected an object with exactly the fields "
                           f"{', '.join(_FIELDS)}")
    return Op(**fields)


# --- recording ---------------------------------------------------------------------------------


class Recorder:
    """Records a history from many client threads at once.

    ``invoke`` opens an op just before the client sends its request; ``complete`` closes it
    just after the outcome is known. An op still open is ``"unknown"`` with no return time,
    which is exactly what it is if the run ends (or the client dies) before it completes.
    Indexes are given in invocation order. The clock is read under the lock, so indexes and
    ``call_ns`` increase together.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: list[Op] = []
        self._open: dict[int, Op] = {}  # process -> its op in flight

    def invoke(self, process: int, kind: str, key: str, value: Any) -> Op:
        """Opens an op for ``process``, which must not have another op open."""
        validate_value(kind, value)
        with self._lock:
            if process in self._open:
                raise HistoryError(f"process {process} invoked {kind} while "
                                   f"op #{self._open[process].index} is still open")
            op = Op(index=len(self._ops), process=process, kind=kind, key=key, value=value,
                    call_ns=time.monotonic_ns(), return_ns=None, status="unknown", result=None)
            self._ops.append(op)
            self._open[process] = op
            return op

    def complete(self, op: Op, status: str, result: Any = None) -> None:
        """Closes ``op`` (open in this recorder) with ``status`` and ``result``; sets its
        ``return_ns``."""
        if status not in STATUSES:
            raise HistoryError(f"unknown status {status!r}")
        with self._lock:
            if self._open.get(op.process) is not op:
                raise HistoryError(f"op #{op.index} is not open in this recorder")
            op.return_ns = time.monotonic_ns()
            op.status = status
            op.result = result
            del self._open[op.process]

    def history(self) -> list[Op]:
        """A copy of the ops recorded so far, by index (open ops included, as unknown)."""
        with self._lock:
            return [dataclasses.replace(op) for op in self._ops]
