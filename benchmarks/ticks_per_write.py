"""How many passes of the Raft loop one write costs, per node (the main CPU cost at low load).

Three nodes in this process and ``--streams`` clients (``kvstore.Client``, each its own
proposal stream, as ``kv bench``'s worker processes have), shared round-robin by ``--clients``
threads that each write sequentially with a session of their own; prints, per node, the ticks
and batches counted by the node layer over ``--writes`` puts in all, entries per batch, and the
time per write.

    .venv/bin/python benchmarks/ticks_per_write.py --writes 500
    .venv/bin/python benchmarks/ticks_per_write.py --writes 4000 --clients 16 --streams 4
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from cli.ports import free_port
from kvstore import ops
from kvstore.client import Client
from kvstore.config import Member, NodeConfig
from kvstore.server import serving
from session import Session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=500, help="in all, over the clients")
    parser.add_argument("--clients", type=int, default=1, help="threads, one write in flight each")
    parser.add_argument("--streams", type=int, default=1, help="Client objects the threads share")
    args = parser.parse_args()
    if not 1 <= args.clients <= args.writes or args.streams < 1:
        parser.error("needs 1 <= --clients <= --writes and --streams >= 1")
    members = [Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for _ in range(3)]
    with tempfile.TemporaryDirectory() as root, ExitStack() as stack:
        nodes = [stack.enter_context(serving(NodeConfig(
            cluster_id=1, node_id=f"n{i + 1}", me=me, peers=tuple(m for m in members if m != me),
            data_dir=Path(root) / f"n{i + 1}", secret="ticks-per-write")))
            for i, me in enumerate(members)]
        with ExitStack() as clients:
            shared = [clients.enter_context(Client([m.api_address for m in members], timeout=10))
                      for _ in range(args.streams)]
            each = args.writes // args.clients
            clients_of_threads = [shared[i % len(shared)] for i in range(args.clients)]
            users = [(client, client.sync_get_session()) for client in clients_of_threads]

            def writes(client: Client, session: Session) -> None:
                for _ in range(each):
                    client.sync_propose(session, ops.put(b"k", b"v" * 100))
                    session.proposal_completed()

            threads = [threading.Thread(target=writes, args=user) for user in users]
            before = [dict(node.raft.counters) for node in nodes]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            total = each * args.clients
            for node, counted in zip(nodes, before, strict=True):
                now = node.raft.counters
                ticks = now["ticks"] - counted.get("ticks", 0)
                batches = now["batches"] - counted.get("batches", 0)
                entries = now["batched_entries"] - counted.get("batched_entries", 0)
                role = "leader" if node.is_leader() else "follower"
                per_batch = f" ({entries / batches:.1f} entries each)" if batches else ""
                print(f"{node.config.node_id} {role:8} ticks/write {ticks / total:.2f} "
                      f"batches {batches}{per_batch}")
        print(f"{elapsed / total * 1000:.3f} ms per write ({args.clients} client thread(s), "
              "nodes in-process)")


if __name__ == "__main__":
    main()
