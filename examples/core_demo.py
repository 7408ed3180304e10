"""Exactly-once in five steps, on two in-process replicas of the state machine.

No network and no Raft here: a Python list plays the replicated log, so you can watch the
session rules alone. ``kv demo`` shows the same on a real three-node cluster.
Run from the repository root (``make venv`` sets up .venv the first time):
``make venv && .venv/bin/python examples/core_demo.py``
"""

from __future__ import annotations

from kvstore import StateMachine, encode_entry, ops, results
from session import new_noop_session, new_session

CLUSTER_ID = 1


def main() -> None:
    log: list[bytes] = []
    replicas = [StateMachine(CLUSTER_ID), StateMachine(CLUSTER_ID)]

    def commit(entry: bytes) -> str:
        """Appends an entry to the 'log' and applies it on every replica."""
        log.append(entry)
        answers = {replica.apply(entry) for replica in replicas}
        assert len(answers) == 1, "replicas disagree"
        result = results.decode(answers.pop())
        return f"{results.code_name(result)} number={result.number}"

    session = new_session(CLUSTER_ID)
    print(f"1. open a session: client id {session.client_id}")
    session.prepare_for_register()
    print(f"   register -> {commit(encode_entry(session))}")
    session.prepare_for_propose()

    entry = encode_entry(session, ops.incr(b"counter", 1))
    print(f"2. propose incr(counter) with series id {session.series_id} -> {commit(entry)}")

    print("3. the answer is 'lost' (a timeout): the client retries the SAME bytes, twice")
    print(f"   retry -> {commit(entry)}")
    print(f"   retry -> {commit(entry)}")
    print(f"   counter on each replica: {[int(r.data[b'counter']) for r in replicas]}  (applied once)")

    session.proposal_completed()
    print(f"4. the client completes the proposal; next series id {session.series_id}")
    print(f"   incr(counter) -> {commit(encode_entry(session, ops.incr(b'counter', 1)))}")

    noop = new_noop_session(CLUSTER_ID)
    noop_entry = encode_entry(noop, ops.incr(b"counter", 1))
    print("5. the same retry with a no-op session (no dedup), sent three times:")
    for _ in range(3):
        print(f"   -> {commit(noop_entry)}")
    print(f"   counter: {int(replicas[0].data[b'counter'])}  (one intended increment, three applied)")

    restored = StateMachine(CLUSTER_ID)
    restored.restore(replicas[0].snapshot())
    print(
        f"\n{len(log)} log entries; replica digests {[r.digest() for r in replicas]}; "
        f"a replica restored from a snapshot: {restored.digest()}"
    )


if __name__ == "__main__":
    main()
