"""Embedding nodes in your own Python program.

Runs a three-node cluster inside this one process (each node has its own Raft port, API port
and data directory, exactly as separate processes would), then talks to it with the client
library. In a real deployment each program embeds one node: call ``serving(config)`` with that
node's own ``NodeConfig`` and its peers.

Run from the repository root (``make venv`` sets up .venv the first time):
``make venv && .venv/bin/python examples/embedded_node.py``
"""

from __future__ import annotations

import secrets
import socket
import tempfile
from contextlib import ExitStack
from pathlib import Path

from kvstore.client import Client
from kvstore.config import Member, NodeConfig
from kvstore.server import serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    cluster_id = secrets.randbits(63) | 1
    secret = secrets.token_hex(32)  # every node of a cluster shares it (it authenticates Raft traffic)
    members = [Member(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for _ in range(3)]
    with tempfile.TemporaryDirectory() as data, ExitStack() as nodes:
        for index, me in enumerate(members):
            config = NodeConfig(
                cluster_id=cluster_id,
                node_id=f"n{index + 1}",
                me=me,
                peers=tuple(m for m in members if m != me),
                data_dir=Path(data) / f"n{index + 1}",
                secret=secret,
            )
            nodes.enter_context(serving(config))  # stops the node when the block ends

        with Client([m.api_address for m in members], timeout=10) as client:
            client.put(b"greeting", b"hello from an embedded cluster")
            print(client.get(b"greeting").value.decode())
            print("visits:", client.incr(b"visits").number)
            # Followers may show one entry less: they learn that the last entry committed from
            # the leader's next append or heartbeat (at most 50 ms later).
            for m in members:
                status = client.status(m.api_address)
                print(f"  {status.node_id}: {status.role:9} applied {status.applied_index}")


if __name__ == "__main__":
    main()
