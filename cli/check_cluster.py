"""The cluster under test in ``kv check``: node processes whose Raft traffic runs through link
proxies, so the harness can kill, pause and partition them, and (with ``power_loss``) whose data
directories are power-loss file systems, so it can cut their power.

Every directed link between two nodes goes through its own proxy on 127.0.0.1
(``kvstore.check.proxy.Network``); a node dials its peers through them (``--dial-via``) while
keeping their real addresses as their identities. Cutting a link needs no root and no firewall.

A power loss (``power_off``) of several nodes is simultaneous: every one is frozen (SIGSTOP)
before any disk is cut, so none acknowledges anything after the first cut; then each disk drops
what was not synced (``kvstore.check.powerfs_mount``), the processes are killed and the mounts
go. ``power_on`` mounts the durable images and starts the nodes again.

With a ``topology`` (``kv check --net netns``), each node is instead started in a network
namespace of its own, on its own address with TLS on its API, and ``network`` is that real
network's links (``cli.check_netns.NamespaceLinks``): the same calls, made with routes, tc and
nftables instead of proxies.

The member set changes during a run (the ``membership`` fault): ``new_node`` describes a node
to add and gives it its proxies, ``forget`` stops a removed node and drops it. ``spec`` is
always the current members (learners included) and the clients handed to ``follow`` are told
every change of endpoints (as etcd's ``SetEndpoints``), so that they never end up knowing only
nodes that were removed. A new node's Raft address sorts after every other, because only the
larger address dials (``Network.add_node``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from cli import processes
from cli.check_netns import NamespaceLinks, create_cluster_dir
from cli.cluster_dir import ClusterDir, ClusterSpec, NodeSpec
from cli.ports import HOST, bindable
from kvstore import errors
from kvstore.check.netns import Topology
from kvstore.check.powerfs_mount import PowerMount
from kvstore.check.proxy import Network
from kvstore.client import Client

STOP_TIMEOUT = 10.0
RESTART_TIMEOUT = 30.0
"""Seconds a node restarted after a power loss gets to answer its status RPC."""


class CheckCluster:
    def __init__(self, root: Path, nodes: int, *, snapshot_count: int, fsync: bool = True,
                 planted_bug: str | None = None, power_loss: bool = False,
                 topology: Topology | None = None) -> None:
        self.dir = ClusterDir(root)
        self.topology = topology
        self.network: Network | NamespaceLinks
        if topology is None:
            self.spec: ClusterSpec = self.dir.create(nodes, snapshot_count=snapshot_count,
                                                     fsync=fsync)
            self.network = Network([node.raft for node in self.spec.nodes])
        else:  # kv check --net netns: each node on a machine of its own (cli.check_netns)
            self.spec = create_cluster_dir(self.dir, topology, snapshot_count=snapshot_count,
                                           fsync=fsync)
            self.network = NamespaceLinks(topology, self.spec)
        self.dir.prepare_node_dirs(self.spec)
        self.client_tls = self.dir.certs.client_tls() if self.spec.tls else None
        self.planted_bug = planted_bug
        self.power_loss = power_loss
        self._followers: list[Client] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        self.powered_off: set[str] = set()
        self.disks: dict[str, PowerMount] = {}
        if power_loss:
            try:
                for node in self.spec.nodes:
                    disk = PowerMount(self.dir.data_dir(node), self.dir.node_dir(node.id) / "disk")
                    self.disks[node.id] = disk
                    disk.mount()
            except BaseException:
                self._unmount_all()
                self.network.close()
                raise

    def client(self, timeout: float, endpoints: list[str] | None = None) -> Client:
        """A client of the cluster (with its client certificate when the API is TLS)."""
        return Client(endpoints or self.endpoints, timeout=timeout, tls=self.client_tls)

    @property
    def node_ids(self) -> list[str]:
        return [node.id for node in self.spec.nodes]

    @property
    def endpoints(self) -> list[str]:
        return self.spec.endpoints

    def node(self, node_id: str) -> NodeSpec:
        return self.spec.node(node_id)

    # -- processes ----------------------------------------------------------------------------

    def start(self, node_id: str) -> subprocess.Popen[bytes]:
        node = self.node(node_id)
        extra = [arg for peer, proxy in self.network.dial_via(node.raft).items()
                 for arg in ("--dial-via", f"{peer}={proxy}")]
        if self.planted_bug:
            extra += ["--planted-bug", self.planted_bug]
        prefix = self.topology.exec_prefix(node_id) if self.topology else []
        proc = processes.start_node(self.dir, self.spec, node, extra, prefix)
        self._procs[node_id] = proc
        return proc

    def start_all(self) -> None:
        for node_id in self.node_ids:
            self.start(node_id)

    def running(self, node_id: str) -> bool:
        proc = self._procs.get(node_id)
        return proc is not None and proc.poll() is None

    def kill(self, node_id: str) -> None:
        proc = self._procs[node_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        self.paused.discard(node_id)

    def pause(self, node_id: str) -> None:
        os.kill(self._procs[node_id].pid, signal.SIGSTOP)
        self.paused.add(node_id)

    def resume(self, node_id: str) -> None:
        if node_id in self.paused and self.running(node_id):
            os.kill(self._procs[node_id].pid, signal.SIGCONT)
        self.paused.discard(node_id)

    def power_off(self, node_ids: list[str], torn_seed: int | None = None) -> None:
        """A simultaneous power loss of ``node_ids``: frozen, disks cut, killed, unmounted.

        With ``torn_seed``, the disks tear their last unsynced writes (``powerfs.Volume.cut``)."""
        running = [n for n in node_ids if self.running(n)]
        for node_id in running:
            os.kill(self._procs[node_id].pid, signal.SIGSTOP)
        for node_id in node_ids:
            self.disks[node_id].cut(None if torn_seed is None else torn_seed + len(node_id))
        for node_id in running:
            self._procs[node_id].kill()
        for node_id in running:
            self._procs[node_id].wait(STOP_TIMEOUT)
        for node_id in node_ids:
            self.paused.discard(node_id)
            self.disks[node_id].unmount()
            self.powered_off.add(node_id)

    def power_on(self, node_ids: list[str]) -> list[str]:
        """Boots ``node_ids`` from their durable images; returns a line for each one that did
        not come back (its process exited, or it did not answer within ``RESTART_TIMEOUT``)."""
        for node_id in node_ids:
            self.disks[node_id].mount()
            self.powered_off.discard(node_id)
            self.start(node_id)
        return [problem for node_id in node_ids if (problem := self._await_up(node_id))]

    def _await_up(self, node_id: str) -> str | None:
        client = self.client(2, [self.node(node_id).api])
        try:
            deadline = time.monotonic() + RESTART_TIMEOUT
            while time.monotonic() < deadline:
                if not self.running(node_id):
                    log = processes.last_start_log(self.dir.log_file(node_id), lines=1)
                    return f"{node_id} exited after its restart: {' '.join(log) or '(no log)'}"
                try:
                    client.status(self.node(node_id).api, timeout=0.5)
                    return None
                except errors.Unavailable:
                    time.sleep(0.1)
            return f"{node_id} did not answer within {RESTART_TIMEOUT:.0f} s of its restart"
        finally:
            client.close()

    # -- membership ---------------------------------------------------------------------------

    def follow(self, client: Client) -> None:
        """Keeps ``client.endpoints`` equal to the members' API addresses from now on."""
        self._followers.append(client)

    def new_node(self) -> NodeSpec:
        """A fresh node (new name, empty data directory, ``--join``), made part of ``spec`` and
        of the network, not started: ``cluster_nodes.grow`` starts and adds it."""
        fresh = self.dir.new_node(self.spec)
        node = replace(fresh, raft=f"{HOST}:{_port_after(self.network.nodes)}")
        self.network.add_node(node.raft)
        self._set_spec(replace(self.spec, nodes=(*self.spec.nodes, node)))
        self.dir.prepare_node_dirs(self.spec)
        if self.power_loss:
            disk = PowerMount(self.dir.data_dir(node), self.dir.node_dir(node.id) / "disk")
            self.disks[node.id] = disk
            disk.mount()
        return node

    def forget(self, node_id: str) -> None:
        """Stops ``node_id`` (no longer a member, or never made one) and drops it: from
        ``spec``, the network, the followers' endpoints. Its directory is kept."""
        node = self.node(node_id)
        self.resume(node_id)
        proc = self._procs.pop(node_id, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self._set_spec(replace(self.spec, nodes=tuple(n for n in self.spec.nodes
                                                      if n.id != node_id)))
        self.network.remove_node(node.raft)
        self.powered_off.discard(node_id)
        disk = self.disks.pop(node_id, None)
        if disk is not None:
            disk.unmount()

    def _set_spec(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.dir.save(spec)
        for client in self._followers:
            client.endpoints = list(spec.endpoints)

    def heal(self) -> None:
        """Ends every fault: links healed, paused nodes resumed, killed or powered-off nodes
        restarted."""
        self.network.heal()
        for node_id in list(self.paused):
            self.resume(node_id)
        if self.powered_off:
            self.power_on(sorted(self.powered_off))
        for node_id in self.node_ids:
            if not self.running(node_id):
                self.start(node_id)

    def close(self) -> None:
        """Stops every node (SIGTERM, then SIGKILL) and the proxies."""
        for node_id in list(self.paused):
            self.resume(node_id)
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self._procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self.network.close()
        self._unmount_all()

    def _unmount_all(self) -> None:
        for disk in self.disks.values():
            disk.unmount()

    # -- observation --------------------------------------------------------------------------

    def leader_id(self, client: Client) -> str | None:
        for node in self.spec.nodes:
            if node.id in self.paused or not self.running(node.id):
                continue
            try:
                if client.status(node.api, timeout=0.5).role == "leader":
                    return node.id
            except errors.Unavailable:
                continue
        return None


def _port_after(raft_addresses: tuple[str, ...]) -> int:
    """A free loopback port whose ``HOST:port`` sorts after every one of ``raft_addresses``."""
    highest = max(raft_addresses)
    for port in range(int(highest.rsplit(":", 1)[1]) + 1, 65536):
        if f"{HOST}:{port}" > highest and bindable(port):
            return port
    raise RuntimeError(f"no free port sorts after {highest}")
