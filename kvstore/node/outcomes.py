"""What became of a proposal: applied, certainly not applied, or unknown.

PySyncObj reports a failed call with a ``FAIL_REASON``. For exactly-once the only question is
whether the entry may still take effect, because that decides whether a retry without a session
is safe. This module sorts the reasons into the two answers.
"""

from __future__ import annotations

import threading
from typing import Any

from pysyncobj import FAIL_REASON

REASON_NAMES: dict[int, str] = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}

# QUEUE_FULL and MISSING_LEADER fail before the entry reaches any log; NOT_LEADER is a leader
# refusing a forwarded command before appending it; REQUEST_DENIED is a refused membership or
# version change; DISCARDED means the index we were given now holds another term's entry: ours
# was overwritten, and PySyncObj never proposes it again.
DEFINITELY_NOT_APPLIED = frozenset({
    FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
    FAIL_REASON.NOT_LEADER, FAIL_REASON.REQUEST_DENIED,
})
# LEADER_CHANGED: a follower lost the leader after forwarding (the old leader may have appended
# it); UNKNOWN_OUTCOME: the index was applied before we learnt of it (e.g. by a snapshot).
OUTCOME_UNKNOWN = frozenset({FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME})


class ProposeError(Exception):
    """Base class; ``reason`` is the FAIL_REASON name, or ``TIMEOUT`` / ``NODE_FAILED``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class NotApplied(ProposeError):
    """The entry was not applied and never will be: a retry is safe anywhere."""


class OutcomeUnknown(ProposeError):
    """The entry may be applied, now or later: only a session makes a retry safe."""


class Pending:
    """The callback handed to PySyncObj. It runs on the tick thread, so it only stores and signals."""

    __slots__ = ("event", "result", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Any = None
        self.error: int | None = None

    def __call__(self, result: Any, error: int) -> None:  # PySyncObj's callback(result, failReason)
        self.result = result
        self.error = error
        self.event.set()

    def outcome(self) -> bytes:
        """The result bytes, or the exception that says what became of the entry."""
        if self.error == FAIL_REASON.SUCCESS:
            return self.result  # type: ignore[no-any-return]
        name = REASON_NAMES.get(self.error, str(self.error))  # type: ignore[arg-type]
        if self.error in DEFINITELY_NOT_APPLIED:
            raise NotApplied(name)
        raise OutcomeUnknown(name)


class BatchCallback:
    """The callback of one replicated batch: hands each proposer its own entry's result."""

    __slots__ = ("waiters",)

    def __init__(self, waiters: list[Pending]) -> None:
        self.waiters = waiters

    def __call__(self, results: Any, error: int) -> None:
        if error != FAIL_REASON.SUCCESS:
            for pending in self.waiters:
                pending(None, error)
        elif not isinstance(results, list) or len(results) != len(self.waiters):
            # A batch that did not decode on apply: nothing was applied, but say "unknown"
            # rather than guess (our node never sends such a batch).
            for pending in self.waiters:
                pending(None, FAIL_REASON.UNKNOWN_OUTCOME)
        else:
            for pending, result in zip(self.waiters, results, strict=True):
                pending(result, FAIL_REASON.SUCCESS)
