"""``kv check --net netns``: the cluster under test on machines made of network namespaces.

Each node runs in a namespace of its own (``kvstore.check.netns``) with its own address, its
Raft and API ports on that address, TLS on the API and the cluster secret on Raft, started with
``ip netns exec NS ... kv node run`` as on a separate machine; the checker itself, with every
client, runs in the client namespace. The faults are then the network's own: partitions are
blackhole routes, ``netem`` is ``tc netem`` delay, jitter, loss and reordering on a link, ``loss``
is nftables dropping a share of a link's frames. On a kernel without sch_netem, ``netem`` is
the same model in user space (``kvstore.check.nfq_netem``); each fault says which it was.

Two processes: the one the user started builds the network, runs a copy of itself
(the same arguments) inside the client namespace with ``KV_CHECK_NETNS`` naming the network's
description, and removes the network when that copy ends, whatever way it ends: the copy
exits, fails, or the user's process gets Ctrl-C or SIGTERM (passed on to the copy, which stops
its nodes first). So the namespaces are removed by a process that does nothing else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cli.cluster_dir import ClusterDir, ClusterSpec, NodeSpec
from cli.files import write_atomic
from kvstore.check import netns
from kvstore.check.netns import Netem, Topology

ENV = "KV_CHECK_NETNS"
"""Set in the copy that runs inside the client namespace: the file describing the network."""
RAFT_PORT = 2380
API_PORT = 2379
"""Each node is a machine of its own: the standard ports, as in the README's how-to."""
CHILD_STOP_GRACE = 60.0
"""Seconds the copy gets, after SIGTERM, to stop its nodes and write nothing more."""


def inside() -> Topology | None:
    """The network this process runs in (the copy in the client namespace), else None."""
    path = os.environ.get(ENV)
    if not path:
        return None
    return Topology.from_json(Path(path).read_text())


def run_outside(nodes: int) -> int:
    """Builds a network for ``nodes`` nodes, runs this command again in its client namespace,
    removes the network; returns the copy's exit code."""
    with tempfile.TemporaryDirectory(prefix="kv-check-netns-") as tmp, \
            netns.network(nodes) as topology:
        description = Path(tmp) / "network.json"
        description.write_text(topology.to_json())
        argv = [*topology.exec_prefix(netns.CLIENT), sys.executable, "-m", "cli", *sys.argv[1:]]
        child = subprocess.Popen(argv, env={**os.environ, ENV: str(description)})
        try:
            return child.wait()
        except BaseException:  # Ctrl-C or SIGTERM (netns.Topology turns it into Ctrl-C)
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(CHILD_STOP_GRACE)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise


def create_cluster_dir(cluster: ClusterDir, topology: Topology, *, snapshot_count: int,
                       fsync: bool) -> ClusterSpec:
    """A cluster directory whose nodes are the topology's nodes, each on its own address with
    the standard ports, with a secret and certificates for those addresses (TLS on)."""
    nodes = tuple(
        NodeSpec(id=name, raft=f"{topology.address(name)}:{RAFT_PORT}",
                 api=f"{topology.address(name)}:{API_PORT}", data_dir=f"{name}/data")
        for name in topology.node_names)
    spec = ClusterSpec(cluster_id=secrets.randbits(63) | 1, nodes=nodes,
                       snapshot_count=snapshot_count, fsync=fsync, tls=True)
    cluster.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(cluster.secret_file, secrets.token_hex(32).encode() + b"\n", mode=0o600)
    cluster.certs.create((node.id, node.api) for node in nodes)
    cluster.save(spec)
    return spec


class NamespaceLinks:
    """The links of a cluster in namespaces, with the calls of ``kvstore.check.proxy.Network``
    that the cluster and the nemesis make (``dial_via``, ``partition``, ``heal``, ``close``),
    plus the link faults only a real network has (``impair``, ``drop``)."""

    def __init__(self, topology: Topology, spec: ClusterSpec) -> None:
        self.topology = topology
        self._host = {node.raft: node.id for node in spec.nodes}

    def dial_via(self, raft: str) -> dict[str, str]:
        return {}  # every peer is dialed at its own address

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        self.topology.partition([{self._host[raft] for raft in group} for group in groups])

    def impair(self, host: str, netem: Netem, seed: int) -> str:
        return self.topology.impair(host, netem, seed)

    def unimpair(self, host: str) -> None:
        self.topology.unimpair(host)

    def drop(self, host: str, percent: int) -> None:
        self.topology.drop(host, percent)

    def undrop(self, host: str) -> None:
        self.topology.undrop(host)

    def heal(self) -> None:
        self.topology.heal()

    def close(self) -> None:
        self.topology.heal()  # the namespaces themselves go with the process that made them
