"""A leader's send step held to a budget per pass of the Raft loop (PySyncObj defect D15).

The rule: in one pass, once ``SEND_BUDGET`` has been spent in the send step, a follower that is
behind (log entries it misses, or the dump) is sent no more in this pass; but every follower
gets its first message of every pass (a heartbeat, or one batch of what it misses, so no
follower waits on another's catch-up), and the rest follows in the next passes, a few
milliseconds apart.

Why. PySyncObj's ``__sendAppendEntries`` sends a follower that is behind batch after batch, on
the tick thread, until the follower has it all or ``appendEntriesPeriod`` (50 ms here) has
passed since the step began, checked once per batch. A new member that has just installed the
dump of 1M keys is 7,600 entries behind: measured (``benchmarks/big_state.py``), the leader's
pass that sent them lasted 158 ms, 60 ms of it its own CPU, over the 100 ms in which a pass
must follow a pass (issue 9). The dump's batches were already held to the budget
(``kvstore.node.snapshotter``); this holds the log's batches to the same one, with one rule
for both.

How. PySyncObj's loop for a follower goes on while the follower's next index is within the
log (or a dump is being sent). Past the budget, after each append the pacer parks the
follower's next index one past the log's end, which ends the loop for it; the snapshotter
parks the same way and sends no further dump batch. The indexes are put back when the step
ends, before anything else reads them. A next index is a hint (Raft section 3.5: a leader
may send from any index the follower accepts), so what the pacer changes is when entries
leave, never which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

SEND_BUDGET = 0.005
"""Seconds per pass a leader spends sending to followers that are behind: the rest of the pass
is for the writes. (PySyncObj's own loop sends until ``appendEntriesPeriod``, 50 ms here, has
passed.) The node passes at least every 10 ms, so this is up to half of its time."""


class SendPacer:
    """Wraps the leader's send step (``Internals.wrap_send``) and its messages (``wrap``)."""

    def __init__(self, next_index: dict[Any, int], raft_log: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._next_index = next_index
        self._log = raft_log
        self._clock = clock
        self._started: float | None = None
        """When the send step in progress began; None outside one."""
        self._parked: dict[Any, int] = {}
        """Followers parked in this step, with the next index to put back."""
        self._served: set[Any] = set()
        """Followers sent a message in this step."""

    def step(self, send_step: Callable[[], None]) -> None:
        """Runs PySyncObj's send step (``__sendAppendEntries``) under the budget."""
        self._started = self._clock()
        try:
            send_step()
        finally:
            self._started = None
            for node, index in self._parked.items():
                self._next_index[node] = index
            self._parked.clear()
            self._served.clear()

    def spent_for(self, node: Any) -> bool:
        """Whether ``node``, already sent a message in the step in progress, is to be sent no
        more in it: the step has used its budget (never outside a step)."""
        return (self._started is not None and node in self._served
                and self._clock() - self._started > SEND_BUDGET)

    def park(self, node: Any) -> None:
        """Ends this step's sending to ``node``: its next index goes past the log's end."""
        self._parked.setdefault(node, self._next_index[node])
        self._next_index[node] = self._log[-1][1] + 1

    def wrap(self, send: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """The transport's ``send``, parking a follower still behind once the budget is spent."""
        def paced(node: Any, message: Any) -> Any:
            result = send(node, message)
            if self._started is None:
                return result
            self._served.add(node)
            if (type(message) is dict and "entries" in message and node in self._next_index
                    and self._next_index[node] <= self._log[-1][1] and self.spent_for(node)):
                self.park(node)
            return result
        return paced
