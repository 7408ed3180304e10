"""How many passes of the Raft loop one write costs, per node (the main CPU cost at low load).

Three nodes in this process, one client writing sequentially; prints, per node, the ticks and
batches counted by the node layer over ``--writes`` puts, and the time per write.

    .venv/bin/python benchmarks/ticks_per_write.py --writes 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from cli.ports import free_port
from kvstore import ops
from kvstore.client import Client
from kvstore.config import Member, NodeConfig
from kvstore.server import serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=500)
    args = parser.parse_args()
    members = [Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for _ in range(3)]
    with tempfile.TemporaryDirectory() as root, ExitStack() as stack:
        nodes = [stack.enter_context(serving(NodeConfig(
            cluster_id=1, node_id=f"n{i + 1}", me=me, peers=tuple(m for m in members if m != me),
            data_dir=Path(root) / f"n{i + 1}", secret="ticks-per-write")))
            for i, me in enumerate(members)]
        with Client([m.api_address for m in members], timeout=10) as client:
            session = client.sync_get_session()
            before = [dict(node.raft.counters) for node in nodes]
            started = time.perf_counter()
            for _ in range(args.writes):
                client.sync_propose(session, ops.put(b"k", b"v" * 100))
                session.proposal_completed()
            elapsed = time.perf_counter() - started
            for node, counted in zip(nodes, before, strict=True):
                now = node.raft.counters
                ticks = now["ticks"] - counted.get("ticks", 0)
                batches = now["batches"] - counted.get("batches", 0)
                role = "leader" if node.is_leader() else "follower"
                print(f"{node.config.node_id} {role:8} ticks/write {ticks / args.writes:.2f} "
                      f"batches {batches}")
        print(f"{elapsed / args.writes * 1000:.2f} ms per write (one client, nodes in-process)")


if __name__ == "__main__":
    main()
