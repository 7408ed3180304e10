"""One round of appends in flight: a leader's new proposals wait while its last entry is on no
majority yet, then leave together.

The rule: at the start of each pass of the Raft loop, a leader turns the proposals waiting for
it into a batch (group commit, ``RaftNode._n_send_waiting``) only if the last entry of its log
is already held by a majority of the voters, its own copy counted. Otherwise they wait for the
acknowledgement that completes the round in flight; that acknowledgement ends the pass's wait
in ``poll()``, and the next pass appends them, all of them, as one batch.

Why. Each replicated batch costs the same whatever it carries: an append to each follower, each
follower's sync and acknowledgement, and a pass of every node's loop to send, read and commit
it. With the driven loop waking on every proposal, a leader serving several streams made a
batch of each stream's request as it came: 3.1 entries per batch with 16 clients over 4
streams (``benchmarks/ticks_per_write.py --clients 16 --streams 4``). What arrives during a
round now waits for that round and shares the next batch. etcd batches the same way: what
arrives while its Raft loop handles one ``Ready`` goes out in the next.

What it costs. A lone proposal finds no round open and leaves at once, as before. A proposal
that arrives during a round waits at most for the round, which its own append would have
waited behind anyway: a follower syncs and acknowledges in log order, and the leader applies
in log order. ``kvstore.batching`` makes the same trade on the client (one request in flight
per node).

What it never changes: which entries are appended and in which order, or any entry's fate.
Proposals that wait are in no log; if the node stops leading meanwhile, the pass that finds
them refuses them as certainly not applied (``NOT_LEADER``), as it did before. A node with no
other voter (one node, or learners only) never waits: its own copy is a majority.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def round_open(last_index: int, match_index: Mapping[Any, int], voters: Collection[Any]) -> bool:
    """Whether a leader's entry ``last_index`` is on no majority yet.

    ``voters`` are the other voters; ``match_index`` is, per follower, the highest entry it
    acknowledged (a voter missing from it holds nothing yet). The leader's own copy counts: of
    2k + 1 voters, k followers must hold the entry.
    """
    holders = 1 + sum(1 for voter in voters if match_index.get(voter, 0) >= last_index)
    return 2 * holders <= len(voters) + 1
