"""Whose turn it is to take a snapshot: the members of a cluster take theirs one at a time.

The rule: the log is cut into slots of ``every // n`` entries (``n`` members); a member may start
a snapshot only while its applied index is in one of its own slots (slot number modulo ``n`` is
its rank among the members' addresses, sorted), or once its log has grown to twice ``every``
(overdue: a member never waits longer than that), or when asked to (a backup).

Why. PySyncObj starts a snapshot when the log passes ``--snapshot-count`` entries, and the
members of a cluster pass it at the same index, so all of them took their snapshots at the same
time: at 1M keys, three threads encoding 113 MiB each, on top of the writes, and the leader
waiting for acknowledgements from followers that were as busy as it was. Measured
(``benchmarks/big_state.py``): the tick threads then waited for a core for 100-300 ms at a time
(``kvstore.node.gap_causes``). One at a time, a follower's snapshot leaves the leader a quorum of
members that are not taking one, and the machine has one encoder to run, not three.

A snapshot's index never changes what it holds (the state at that index) and every replica
restores any index, so when each member takes its snapshot changes nothing a client can see:
only how long the log grows between two (at most ``2 * every`` entries).
"""

from __future__ import annotations

from collections.abc import Iterable


def my_turn(applied: int, every: int, members: Iterable[str], me: str, log_length: int) -> bool:
    """Whether member ``me`` may start a snapshot at ``applied`` with ``log_length`` entries."""
    ordered = sorted(set(members) | {me})
    n = len(ordered)
    width = every // n
    if n == 1 or width == 0 or log_length >= 2 * every:
        return True
    return (applied // width) % n == ordered.index(me)
