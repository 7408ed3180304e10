"""A fence for PySyncObj defect D6: needless truncation of a follower's log.

What goes wrong in 0.3.17: the leader pipelines appends. A success reply to an *older* append
sets the leader's nextIndex for that follower back, so the leader re-sends entries the follower
already holds. The follower then deletes every entry after ``prevLogIdx``, even when nothing
conflicts, including entries it has applied; and the leader's matchIndex does not move back, so
it may count that follower for entries it no longer holds. Raft (thesis 3.5) only ever truncates
at a *conflict*.

The fence wraps the transport's message callback (which runs on the tick thread):

* leader side: a success reply never moves nextIndex back;
* follower side: an append that does not conflict is trimmed to start after our last matching
  entry; one that is entirely covered, when our last entry has the sender's term (one leader per
  term, so by log matching our whole log is the leader's), becomes a heartbeat at our last index.
  Real conflicts pass through untouched and PySyncObj truncates, as Raft says; so does an
  append whose ``prevLogTerm`` does not match ours (PySyncObj rejects it, as Raft says).

The follower side needs no term check of its own: PySyncObj drops an append from an older term
before it reads anything else, so what the fence makes of one changes nothing. Each rule has its
test in ``tests/unit/test_d6_fence.py``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from pysyncobj import SyncObj

from kvstore.node.internals import Internals

log = logging.getLogger("kvstore.node.d6")


def install(syncobj: SyncObj, internals: Internals, counters: Counter[str]) -> None:
    original = internals.transport._onMessageReceivedCallback

    def on_message(node: Any, message: Any) -> None:
        if type(message) is dict:
            kind = message.get("type")
            if kind == "append_entries" and "prevLogIdx" in message and "transmission" not in message:
                try:
                    _trim_follower_append(internals, counters, message)
                except Exception:
                    log.exception("d6 fence (follower) failed; message passed through unchanged")
            elif (kind == "next_node_idx" and message.get("success") and not message.get("reset")
                  and syncobj._isLeader()):
                before = internals.next_index.get(node)
                original(node, message)
                after = internals.next_index.get(node)
                if before is not None and after is not None and after < before:
                    internals.next_index[node] = before
                    counters["d6_leader_next_index_kept"] += 1
                return
        original(node, message)

    internals.transport.setOnMessageReceivedCallback(on_message)


def _trim_follower_append(internals: Internals, counters: Counter[str],
                          message: dict[str, Any]) -> None:
    if message.get("prevLogIdx") is None:
        return
    raft_log = internals.raft_log
    first, last = raft_log[0][1], raft_log[-1][1]
    prev = message["prevLogIdx"]
    entries = message.get("entries") or []
    if prev >= last or prev < first:
        return  # a plain append at our end, or below our compacted prefix: PySyncObj handles it
    if raft_log[prev - first][2] != message["prevLogTerm"]:
        return  # prev does not match: PySyncObj rejects, which is correct
    covered = 0
    while covered < len(entries) and entries[covered][1] <= last:
        if raft_log[entries[covered][1] - first][2] != entries[covered][2]:
            return  # a genuine conflict: truncating from prev + 1 is what Raft does
        covered += 1
    rest = entries[covered:]
    if rest:
        message["prevLogIdx"], message["prevLogTerm"], message["entries"] = last, raft_log[-1][2], rest
        counters["d6_follower_trimmed"] += 1
    elif raft_log[-1][2] == message["term"]:
        message["prevLogIdx"], message["prevLogTerm"], message["entries"] = last, raft_log[-1][2], []
        counters["d6_follower_tail_kept"] += 1
    else:
        counters["d6_follower_passthrough"] += 1
