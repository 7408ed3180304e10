"""Group commit and the durable mode on a real three-node cluster (nodes in this process).

Many proposals waiting at the leader go out as one replicated batch; each keeps its own
session and its own answer. With ``fsync`` every node flushes its journal before it vouches
for entries (``kvstore.node.durable``).
"""

from __future__ import annotations

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
from tests.support import free_port

pytestmark = pytest.mark.integration

WRITERS = 16
WRITES_EACH = 25



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

        if nodes[0].config.fsync:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(
                    node.raft.counters["journal_fsyncs"] for node in nodes):
                time.sleep(0.05)
            assert all(node.raft.counters["journal_fsyncs"] > 0 for node in nodes)
            # The leader's copy was on disk before any commit counted it (kvstore.node.durable).
            assert [node.raft.counters["commit_before_flush"] for node in nodes] == [0, 0, 0]
        else:
            assert all(node.raft.counters["journal_fsyncs"] == 0 for node in nodes)
