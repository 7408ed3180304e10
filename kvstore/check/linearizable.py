"""Linearizability of per-key registers (put / get / cas), by exhaustive search.

**The question.** A history is linearizable (Herlihy & Wing 1990) if its ops can be put in one
sequence that (a) respects real time: when a returned before b was called, a comes first, and
(b) is legal for the sequential object: replayed against a single register, starting absent,
every op returns what it returned in the history. ``ok`` ops must all be in the sequence;
``fail`` ops must not be (they certainly had no effect); ``unknown`` ops may be or not, and
anywhere after their call: Jepsen's ``:info``. We give an unknown op the return time +infinity
and accept any output from it, which expresses exactly that.

**The search** is Wing & Gong's (1993), with the improvements of Porcupine (Athalye 2017,
after Lowe 2017):

* *P-compositionality* (Horn & Kroening 2015): linearizability is local (Herlihy & Wing,
  Theorem 1), and ops on different keys touch different registers, so the history is
  linearizable iff each key's sub-history is. Each key is searched alone: the cost is
  exponential in one key's concurrency, not the whole history's.
* The ok ops' call and return entries form a doubly linked list in time order. A
  configuration (the ops placed so far, the register's value) may place next any op whose
  call entry comes before the first return entry of an op not yet placed; that return entry
  is the deadline. When no op can be placed, the configuration is a dead end, and the search
  backtracks (an explicit stack, not recursion). A placed op's entries are unlinked ("lifted")
  and relinked on backtracking, in O(1).
* *Caching*: configurations known to be dead ends are remembered and never explored again;
  two paths to the same configuration have the same futures.

**Reductions of our own**, all exact: each keeps every verdict, for the reason given. They
exist because the unknown ops, which a leader crash scatters through the history, would
otherwise float: placeable anywhere after their call, in any combination.

* *Unknown ops are a last resort.* The search succeeds once every ok op is placed: unknown
  ops left over can go last, where nothing sees them and real time allows anything (their
  deadline is infinite). So unknown ops are tried only after the ok candidates. And for the
  same ok ops and value, a configuration with fewer unknown ops placed can do all that one
  with more can (it places the extra ones last), so when it is dead so are those with more:
  the cache keeps, per ok set and value, the minimal dead sets of unknown ops.
* *Unknown ops never stutter.* An unknown op that would leave the register unchanged (a get, a
  cas that does not swap, a put of the value already there) is not placed: any linearization
  that places it so stays legal without it. Unknown gets are dropped at the outset.
* *Legal reads go first.* If a read (an ok get, or an ok cas that did not swap) is legal in a
  configuration, it is the only move tried there. A completion that places it later stays one
  with the read moved to the front: it is legal there (that was checked), it changes nothing
  wherever it is legal, and real time allows it (whatever returned before its call is placed).
* *A seen write happened.* When an ok get returned a value, or an ok cas swapped from it, and
  exactly one op writes that value, the writer took effect before the earliest such op
  returned. An unknown writer is searched as an ok one with that return time (an unknown cas
  as one that swapped): every linearization already meets both constraints.
* *A write no one sees is there to fail a cas.* Take an unknown write of a value that no ok
  get returned, no ok cas swapped from and no unknown cas expects. Until the next write, the
  only ops it can make a difference to are ok cas ops that did not swap: those legal before it
  can move ahead of it, and if none is left it can go (the next write hides it). So such a
  write is tried only when an ok cas that did not swap, and expected the current value, may
  be placed next.
* *Unread values are one value.* A written value that no get returned and no cas expected
  cannot be told from another such value by any op, so they are all replaced by one symbol.
* *Twins go in call order.* Unknown ops with the same effect (same kind, expected value and
  value written, after the renaming above) differ only in their call times, and a
  linearization placing some of them can be rearranged to place them in call order: a
  position that admits an op admits any op called no later, so if j of them fit by some
  position, the j called first do. So an unknown op is placed only after its earlier twins.

The search is still exponential in the worst case (the problem is NP-complete: Gibbons &
Korach 1997): one key written by dozens of clients at once can exhaust it. So it runs under a
step budget per key; a key that exhausts it is reported as a ``"budget"`` violation: not
proved valid, not shown invalid, and never a pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

from kvstore.check.history import Op, by_key, describe, require_kinds, returned_at, validate
from kvstore.check.verdict import BUDGET, CheckResult, Violation, check_convergence

__all__ = ["DEFAULT_MAX_STEPS_PER_KEY", "NONLINEARIZABLE", "REGISTER_KINDS", "check_convergence",
           "check_register"]
# check_convergence lives in verdict.py; it is re-exported here because the runner imports it
# from this module.

REGISTER_KINDS: Final = ("put", "get", "cas")
NONLINEARIZABLE: Final = "nonlinearizable"
DEFAULT_MAX_STEPS_PER_KEY: Final = 2_000_000
"""A few seconds of search per key at most."""

_PREFIX_TAIL: Final = 5
"""How many ops of the longest linearizable prefix a violation names (the last ones)."""


class _Unread:
    """The one symbol standing for every written value that no op reads (see "Unread values
    are one value")."""

    def __repr__(self) -> str:
        return "<an unread value>"


_UNREAD: Final = _Unread()

_State: TypeAlias = str | None | _Unread
"""The register: its value, None when absent (the initial state), or ``_UNREAD``."""


def check_register(ops: Sequence[Op], *,
                   max_steps_per_key: int = DEFAULT_MAX_STEPS_PER_KEY) -> CheckResult:
    """Is the history of put/get/cas ops linearizable, key by key?

    A violation of kind ``"nonlinearizable"`` names the key, the last few ops of the longest
    linearizable prefix found and the op that could not be placed after it. A key whose search
    needs more than ``max_steps_per_key`` steps gets a violation of kind ``"budget"`` and counts
    in ``stats["budget_exhausted_keys"]``. Raises ``HistoryError`` on malformed input.
    """
    validate(ops)
    require_kinds(ops, REGISTER_KINDS, "check_register")
    violations: list[Violation] = []
    stats = {"keys": 0, "ops": 0, "ops_dropped": 0, "steps": 0, "max_steps_one_key": 0,
             "nonlinearizable_keys": 0, "budget_exhausted_keys": 0}
    for key, key_ops in by_key(ops).items():
        kept = [op for op in key_ops if _may_matter(op)]
        outcome = _search(_settle_seen_writes(kept), max_steps_per_key)
        stats["keys"] += 1
        stats["ops"] += len(key_ops)
        stats["ops_dropped"] += len(key_ops) - len(kept)
        stats["steps"] += outcome.steps
        stats["max_steps_one_key"] = max(stats["max_steps_one_key"], outcome.steps)
        if outcome.linearizable is None:
            stats["budget_exhausted_keys"] += 1
            violations.append(Violation(BUDGET, key, (
                f"unknown (search budget exhausted): no verdict after {outcome.steps:,} steps "
                f"over {_ops(len(kept))}; the longest linearizable prefix found has "
                f"{_ops(len(outcome.prefix))}")))
        elif not outcome.linearizable:
            stats["nonlinearizable_keys"] += 1
            violations.append(_explain(key, kept, outcome))
    return CheckResult.of(violations, stats)


# --- preparing the ops -------------------------------------------------------------------------


def _may_matter(op: Op) -> bool:
    """False for the ops no linearization needs: failed ones (no effect, certainly) and unknown
    gets (no effect, no known output: they always stutter)."""
    return op.status == "ok" or (op.status == "unknown" and op.kind != "get")


def _settle_seen_writes(ops: list[Op]) -> list[Op]:
    """``ops`` with each unknown write of a seen value made ok (see "A seen write happened")."""
    writers = Counter(_value_written(op) for op in ops if op.kind != "get")
    seen = _seen(ops)
    settled = []
    for op in ops:
        value = _value_written(op)
        if op.status == "unknown" and value in seen and writers[value] == 1:
            op = dataclasses.replace(op, status="ok", return_ns=max(op.call_ns, seen[value]),
                                     result=True if op.kind == "cas" else None)
        settled.append(op)
    return settled


def _seen(ops: list[Op]) -> dict[str, int]:
    """The values the register certainly held, each with the earliest return of an op that saw
    it: an ok get that returned it, or an ok cas that swapped from it."""
    seen: dict[str, int] = {}
    for op in ops:
        if op.status == "ok" and (op.kind == "get" or (op.kind == "cas" and op.result)):
            value = op.result if op.kind == "get" else op.value[0]
            if value is not None:
                seen[value] = min(seen.get(value, returned_at(op)), returned_at(op))
    return seen


# --- the model ---------------------------------------------------------------------------------


def _step(state: _State, op: Op, written: _State) -> tuple[bool, _State]:
    """Applies ``op`` to a register holding ``state``: (is it legal?, the new state).

    ``written`` is what a put or cas writes (see ``_written``). Legal means the op's recorded
    output is what a register in ``state`` would answer; an unknown op's output is unknown, so
    only its effect counts. A cas swaps exactly when the register holds the expected value
    (None: expects absent).
    """
    if op.kind == "put":
        return True, written
    if op.kind == "get":
        return op.status != "ok" or op.result == state, state
    swapped = state == op.value[0]
    if op.status == "ok" and op.result != swapped:
        return False, state
    return True, written if swapped else state


def _is_read(op: Op) -> bool:
    """An ok get, or an ok cas that did not swap: wherever it is legal, it changes nothing."""
    return op.status == "ok" and (op.kind == "get" or (op.kind == "cas" and not op.result))


def _value_written(op: Op) -> str | None:
    """What a put or cas writes, as recorded; None for a get."""
    value: str | None = op.value if op.kind == "put" else op.value[1] if op.kind == "cas" else None
    return value


def _written(ops: list[Op]) -> list[_State]:
    """For each op, the value it writes, as ``_UNREAD`` if no op reads it (no ok get returned
    it, no cas expected it); None for a get.

    Exact: ``_step`` compares the state only with get results and cas expected values, and
    none of those equals an unread value or ``_UNREAD``, so every op is legal in the renamed
    run exactly when it was legal in the original one.
    """
    read = {op.result for op in ops if op.kind == "get" and op.status == "ok"}
    read |= {op.value[0] for op in ops if op.kind == "cas"}
    return [v if v is None or v in read else _UNREAD for v in map(_value_written, ops)]


# --- the entry lists ---------------------------------------------------------------------------


class _Entry:
    """A call or return entry in a doubly linked list."""

    __slots__ = ("op", "time", "written", "reads", "slot", "twin", "quiet", "match", "prev",
                 "next")

    def __init__(self, op: Op, time: float, written: _State = None, slot: int = 0,
                 twin: int = 0, quiet: bool = False, match: _Entry | None = None) -> None:
        self.op = op            # _NOBODY for the sentinels
        self.time = time        # call_ns of a call entry, return_ns of a return entry
        self.written = written  # what the op writes, for _step
        self.reads = _is_read(op)
        self.slot = slot        # ok op: its rank by return time; unknown op: by call time
        self.twin = twin        # unknown op: the bit of its previous twin, or 0
        self.quiet = quiet      # unknown op: a write no one sees (see the module docstring)
        self.match = match      # an ok op's call entry: its return entry; else None
        self.prev: _Entry = self  # set when linked
        self.next: _Entry = self


_NOBODY: Final = Op(-1, -1, "get", "", None, 0, None, "unknown", None)
"""The op of the sentinel entries at the ends of each list; never placed."""


class _Lists(NamedTuple):
    ok: _Entry
    """Head of the call and return entries of the ok ops, by time (calls first on ties, so
    intervals that only touch count as overlapping: the permissive reading of a clock tie)."""
    unknown: _Entry
    """Head of the call entries of the unknown ops, by call time."""
    ok_count: int


def _lists(ops: list[Op]) -> _Lists:
    """The two entry lists of one key's ops (fail ops and unknown gets already dropped)."""
    written = _written(ops)
    ok = sorted((i for i, op in enumerate(ops) if op.status == "ok"),
                key=lambda i: (returned_at(ops[i]), i))
    unknown = sorted((i for i, op in enumerate(ops) if op.status != "ok"),
                     key=lambda i: (ops[i].call_ns, i))
    events: list[tuple[float, int, int, _Entry]] = []
    for slot, i in enumerate(ok):
        returned = _Entry(ops[i], returned_at(ops[i]), slot=slot)
        called = _Entry(ops[i], ops[i].call_ns, written[i], slot, match=returned)
        events += [(called.time, 0, i, called), (returned.time, 1, i, returned)]
    heard = _seen(ops).keys() | {ops[i].value[0] for i in unknown if ops[i].kind == "cas"}
    latest_twin: dict[tuple[str, _State, _State], int] = {}
    unknown_entries = []
    for slot, i in enumerate(unknown):
        effect = (ops[i].kind, ops[i].value[0] if ops[i].kind == "cas" else None, written[i])
        twin = latest_twin.get(effect, 0)
        latest_twin[effect] = 1 << slot
        unknown_entries.append(_Entry(ops[i], ops[i].call_ns, written[i], slot, twin,
                                      quiet=written[i] not in heard))
    return _Lists(_linked([e for *_, e in sorted(events, key=lambda e: e[:3])]),
                  _linked(unknown_entries), len(ok))


def _linked(entries: list[_Entry]) -> _Entry:
    """``entries`` linked in order between two sentinels; returns the head. The tail's time is
    +infinity, so walks bounded by a time stop there."""
    head = prev = _Entry(_NOBODY, -math.inf)
    for entry in [*entries, _Entry(_NOBODY, math.inf)]:
        prev.next, entry.prev = entry, prev
        prev = entry
    return head


def _lift(call: _Entry) -> None:
    """Unlinks a call entry and its return entry if any (its op is now placed)."""
    for entry in (call, call.match) if call.match else (call,):
        entry.prev.next = entry.next
        entry.next.prev = entry.prev


def _unlift(call: _Entry) -> None:
    """Relinks what ``_lift(call)`` unlinked, in reverse order (dancing links)."""
    for entry in (call.match, call) if call.match else (call,):
        entry.prev.next = entry
        entry.next.prev = entry


# --- the search --------------------------------------------------------------------------------


class _Config(NamedTuple):
    """A configuration: which ops are placed, and the register's value.

    The ok ops are numbered by return time, and all those before the first one not placed are
    placed, so their set is ``base`` (that first one) and ``window``, a bitset of the ones
    placed after it: small ints, however long the history.
    """

    base: int
    window: int
    unknown: int
    """Bitset of the unknown ops placed, by their slot."""
    state: _State

    def placed_ok(self) -> int:
        return self.base + self.window.bit_count()


_Dead: TypeAlias = dict[tuple[int, int, _State], list[int]]
"""The dead configurations: (base, window, state) -> the minimal sets of unknown ops placed."""


class _Frame(NamedTuple):
    config: _Config
    placed: _Entry | None
    """The entry placed to reach ``config`` (None at the start)."""
    moves: Iterator[_Entry]
    """The candidates still to try from ``config``."""


@dataclass
class _Outcome:
    linearizable: bool | None
    """None: the budget ran out first."""
    steps: int
    prefix: list[Op]
    """The longest linearizable prefix found, in order (all ops placed, when linearizable)."""
    blocked: Op | None = None
    """The op whose deadline passed, unplaced, right after that prefix."""


def _search(ops: list[Op], max_steps: int) -> _Outcome:
    """Wing & Gong's depth-first search over one key's ops, with the reductions above.

    A step is one candidate tried. ``stack`` holds the configurations on the current path,
    each with the generator of its remaining moves.
    """
    lists = _lists(ops)
    if lists.ok_count == 0:
        return _Outcome(True, 0, [])
    dead: _Dead = {}
    start = _Config(0, 0, 0, None)
    stack = [_Frame(start, None, _moves(lists, start))]
    prefix: list[Op] = []  # the longest linearizable prefix met at a dead end ...
    blocked: Op | None = None  # ... and the op whose deadline ended it
    steps = 0
    while stack:
        frame = stack[-1]
        entry = next(frame.moves, None)
        if entry is None:  # every move from here failed: a dead end
            _remember_dead(dead, frame.config)
            if blocked is None or len(stack) - 1 > len(prefix):
                prefix, blocked = _path(stack), _first_deadline(lists.ok).op
            stack.pop()
            if frame.placed is not None:
                _unlift(frame.placed)
            continue
        if steps == max_steps:
            return _Outcome(None, steps, prefix, blocked)
        steps += 1
        child = _place(frame.config, entry, dead)
        if child is None:
            continue
        _lift(entry)
        if child.placed_ok() == lists.ok_count:
            return _Outcome(True, steps, [*_path(stack), entry.op])
        stack.append(_Frame(child, entry, _moves(lists, child)))
    return _Outcome(False, steps, prefix, blocked)


def _path(stack: list[_Frame]) -> list[Op]:
    """The ops placed to reach the configuration on top of ``stack``, in order."""
    return [frame.placed.op for frame in stack if frame.placed is not None]


def _remember_dead(dead: _Dead, config: _Config) -> None:
    """Adds ``config`` to ``dead``, keeping each list of unknown sets minimal."""
    known = dead.setdefault((config.base, config.window, config.state), [])
    placed = config.unknown
    if not any(d & ~placed == 0 for d in known):  # else it is implied already
        known[:] = [d for d in known if placed & ~d] + [placed]


def _moves(lists: _Lists, config: _Config) -> Iterator[_Entry]:
    """The ops that may be placed next from ``config``, lazily: a legal read alone if there is
    one; else the ok ops called before the deadline, then the unknown ones called by it.

    The lists change while this generator is suspended, but are restored (backtracking undoes
    every lift) before it resumes, so it always walks the lists of ``config``.
    """
    read = _legal_read(lists.ok, config.state)
    if read is not None:
        yield read
        return
    yield from _ok_calls(lists.ok)
    unknown = _unknown_calls(lists.unknown, _first_deadline(lists.ok).time)
    if _failed_cas_expects(lists.ok, config.state):
        yield from unknown
    else:
        yield from (entry for entry in unknown if not entry.quiet)


def _ok_calls(ok: _Entry) -> Iterator[_Entry]:
    """The call entries before the first return entry: the ok ops that may be placed next."""
    entry = ok.next
    while entry.match is not None:
        yield entry
        entry = entry.next


def _unknown_calls(unknown: _Entry, deadline: float) -> Iterator[_Entry]:
    """The unknown ops not placed yet that were called by ``deadline``."""
    entry = unknown.next
    while entry.time <= deadline:
        yield entry
        entry = entry.next


def _legal_read(ok: _Entry, state: _State) -> _Entry | None:
    """The first read among the ok ops that may be placed next that is legal in ``state``."""
    for entry in _ok_calls(ok):
        if entry.reads and _step(state, entry.op, entry.written)[0]:
            return entry
    return None


def _failed_cas_expects(ok: _Entry, state: _State) -> bool:
    """Whether an ok cas that did not swap, and expected ``state``, may be placed next."""
    return any(e.reads and e.op.kind == "cas" and e.op.value[0] == state for e in _ok_calls(ok))


def _first_deadline(ok: _Entry) -> _Entry:
    """The first return entry of an ok op not placed."""
    entry = ok.next
    while entry.match is not None:
        entry = entry.next
    return entry


def _place(config: _Config, entry: _Entry, dead: _Dead) -> _Config | None:
    """The configuration after placing ``entry``'s op, or None if it may not be placed there:
    illegal, excluded by a reduction, or leading to a configuration known to be dead."""
    legal, state = _step(config.state, entry.op, entry.written)
    if not legal:
        return None
    base, window, unknown = config.base, config.window, config.unknown
    if entry.match is None:  # an unknown op
        if state == config.state or (entry.twin and not unknown & entry.twin):
            return None  # it would stutter, or an earlier twin is not placed yet
        unknown |= 1 << entry.slot
    else:
        window |= 1 << (entry.slot - base)
        if entry.slot == base:  # slide the window past the placed ok ops
            run = (~window & (window + 1)).bit_length() - 1
            base, window = base + run, window >> run
    if any(d & ~unknown == 0 for d in dead.get((base, window, state), ())):
        return None  # a configuration with at most these unknown ops placed is dead
    return _Config(base, window, unknown, state)


# --- explaining --------------------------------------------------------------------------------


def _explain(key: str, ops: list[Op], outcome: _Outcome) -> Violation:
    """The violation for a key with no linearization, naming a handful of ``ops`` as recorded
    (the search saw some unknown ones as ok)."""
    recorded = {op.index: op for op in ops}
    prefix = [recorded[op.index] for op in outcome.prefix]
    tail = prefix[-_PREFIX_TAIL:]
    assert outcome.blocked is not None  # a failed search always met a deadline
    blocked = recorded[outcome.blocked.index]
    if tail:
        shown = ", ".join(describe(op) for op in tail)
        where = (f"the longest linearizable prefix found has {_ops(len(prefix))}, ending "
                 f"{shown}, and leaves the register {_show(_replay(prefix))}")
    else:
        where = "no op can be linearized first"
    message = (f"no linearization of the {_ops(len(ops))} on {key!r}: {where}; "
               f"{describe(blocked)} cannot be placed after it before it returned")
    return Violation(NONLINEARIZABLE, key, message, [op.index for op in tail] + [blocked.index])


def _replay(ops: list[Op]) -> str | None:
    """The register's value after ``ops``, a legal sequence, with the values as recorded."""
    state: _State = None
    for op in ops:
        state = _step(state, op, _value_written(op))[1]
    assert not isinstance(state, _Unread)
    return state


def _ops(n: int) -> str:
    return f"{n} op" if n == 1 else f"{n} ops"


def _show(state: str | None) -> str:
    return "absent" if state is None else f"holding {state!r}"
