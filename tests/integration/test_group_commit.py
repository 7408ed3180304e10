"""Group commit and the durable mode on a real three-node cluster (nodes in this process).

Many proposals waiting at the leader go out as one replicated batch; each keeps its own
session and its own answer. With ``fsync`` every node flushes its journal before it vouches
for entries (``kvstore.node.durable``; message by message in ``tests/unit/test_durable.py``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from kvstore import ops
from kvstore.client import Client
from kvstore.config import Member, NodeConfig
from kvstore.node import KVNode
from kvstore.server import serving
from tests.support import dirty_pages, free_port, why_dirty_pages_cannot_tell

pytestmark = pytest.mark.integration

WRITERS = 16
WRITES_EACH = 25
DURABILITY_WRITES = 20



def start(tmp_path: Path, *, fsync: bool) -> Iterator[list[KVNode]]:
    members = [Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for _ in range(3)]
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(serving(NodeConfig(
                cluster_id=5, node_id=f"n{i}", me=me, peers=tuple(m for m in members if m != me),
                data_dir=tmp_path / f"n{i}", secret="group-commit-test", fsync=fsync)))
            for i, me in enumerate(members)
        ]
        yield nodes


@pytest.fixture(params=[False, True], ids=["plain", "fsync"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[KVNode]]:
    yield from start(tmp_path, fsync=request.param)


def endpoints(nodes: list[KVNode]) -> list[str]:
    return [node.config.me.api_address for node in nodes]


def test_concurrent_proposals_share_batches_and_each_gets_its_own_answer(nodes: list[KVNode]) -> None:
    answers: dict[int, list[int]] = {}
    with Client(endpoints(nodes), timeout=10) as client:
        client.put(b"warm-up", b"")  # a leader is elected and known

        def writer(number: int) -> None:
            session = client.sync_get_session()
            mine = []
            for _ in range(WRITES_EACH):
                mine.append(client.sync_propose(session, ops.incr(f"gc/{number}".encode())).number)
                session.proposal_completed()
            answers[number] = mine

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(answers[n] == list(range(1, WRITES_EACH + 1)) for n in range(WRITERS)), answers
        leader = next(node for node in nodes if node.is_leader())
        counters = leader.raft.counters
        assert counters["batched_entries"] > counters["batches"], dict(counters)


def test_an_acknowledged_write_is_on_disk_on_a_majority_when_its_answer_arrives(
        nodes: list[KVNode]) -> None:
    """Seen from outside the nodes' code: right after each answer, the test reads every node's
    journal file and asks the kernel whether any of its pages are still only in memory
    (``dirty_pages``). With ``fsync``, a majority must hold the written value in a journal with
    no dirty page: a power loss of every node now would keep the write. Without it, the same
    check fails (the kernel writes back after about 30 s): the control that shows it can."""
    reason = why_dirty_pages_cannot_tell(nodes[0].config.data_dir)
    if reason:
        pytest.skip(reason)
    journals = [Path(node.config.data_dir) / "raft.journal" for node in nodes]
    majority = len(nodes) // 2 + 1
    durable_copies = durable_copies_after_each_write(nodes, journals, "disk", DURABILITY_WRITES)
    if nodes[0].config.fsync:
        assert all(copies >= majority for copies in durable_copies), durable_copies
    else:
        assert any(copies < majority for copies in durable_copies), (
            f"without fsync every write was on disk at once ({durable_copies}): "
            "this check cannot tell, and the fsync variant proves nothing")


def durable_copies_after_each_write(nodes: list[KVNode], journals: list[Path], prefix: str,
                                    writes: int) -> list[int]:
    """Writes ``writes`` values one after another; right after each answer, counts the journals
    that hold the value with no dirty page (no other client writes: nothing new reaches a
    journal until the next proposal)."""
    copies = []
    with Client(endpoints(nodes), timeout=10) as client:
        session = client.sync_get_session()
        for n in range(writes):
            value = f"{prefix}-{n}-{session.client_id}".encode()
            client.sync_propose(session, ops.put(f"{prefix}/{n}".encode(), value))
            copies.append(sum(1 for path in journals
                              if dirty_pages(path) == 0 and value in path.read_bytes()))
            session.proposal_completed()
    return copies


SLOW_SYNC_SECONDS = 0.2
SLOW_DISK_WRITES = 8


def test_with_slow_follower_disks_an_answer_still_waits_for_a_majority_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: every journal sync takes ``SLOW_SYNC_SECONDS`` longer, as behind a snapshot's
    write-back. A follower makes its first one on its tick thread (its disk was quick so far);
    that one is slow, so the next ones go to its sync thread (``kvstore.node.quick_disk``), and
    the tick loop keeps running meanwhile. Either way the acknowledgements must wait for the
    sync: right after each answer, a majority of journals hold the value with no dirty page.
    Acknowledging before the sync returns would let the leader commit on its own durable copy
    alone."""
    reason = why_dirty_pages_cannot_tell(tmp_path)
    if reason:
        pytest.skip(reason)
    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(SLOW_SYNC_SECONDS)  # the injected fault: a slow disk, before the sync
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    for nodes in start(tmp_path, fsync=True):
        journals = [Path(node.config.data_dir) / "raft.journal" for node in nodes]
        durable_copies = durable_copies_after_each_write(nodes, journals, "slow", SLOW_DISK_WRITES)
        held = sum(node.raft.counters["acks_held"] for node in nodes if not node.is_leader())
        assert held >= SLOW_DISK_WRITES, "the followers never held an acknowledgement"
        assert all(copies >= len(nodes) // 2 + 1 for copies in durable_copies), durable_copies
