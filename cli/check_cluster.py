"""The cluster under test in ``kv check``: node processes whose Raft traffic runs through link
proxies, so the harness can kill, pause and partition them.

Every directed link between two nodes goes through its own proxy on 127.0.0.1
(``kvstore.check.proxy.Network``); a node dials its peers through them (``--dial-via``) while
keeping their real addresses as their identities. Cutting a link needs no root and no firewall.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from cli import processes
from cli.cluster_dir import ClusterDir, ClusterSpec, NodeSpec
from kvstore import errors
from kvstore.check.proxy import Network
from kvstore.client import Client

STOP_TIMEOUT = 10.0


class CheckCluster:
    def __init__(self, root: Path, nodes: int, *, snapshot_count: int,
                 planted_bug: str | None = None) -> None:
        self.dir = ClusterDir(root)
        self.spec: ClusterSpec = self.dir.create(nodes, snapshot_count=snapshot_count)
        self.dir.prepare_node_dirs(self.spec)
        self.network = Network([node.raft for node in self.spec.nodes])
        self.planted_bug = planted_bug
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()

    @property
    def node_ids(self) -> list[str]:
        return [node.id for node in self.spec.nodes]

    @property
    def endpoints(self) -> list[str]:
        return self.spec.endpoints

    def node(self, node_id: str) -> NodeSpec:
        return self.spec.node(node_id)

    # -- processes ----------------------------------------------------------------------------

    def start(self, node_id: str) -> None:
        node = self.node(node_id)
        extra = [arg for peer, proxy in self.network.dial_via(node.raft).items()
                 for arg in ("--dial-via", f"{peer}={proxy}")]
        if self.planted_bug:
            extra += ["--planted-bug", self.planted_bug]
        self._procs[node_id] = processes.start_node(self.dir, self.spec, node, extra)

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

    def heal(self) -> None:
        """Ends every fault: links healed, paused nodes resumed, killed nodes restarted."""
        self.network.heal()
        for node_id in list(self.paused):
            self.resume(node_id)
        for node_id in self.node_ids:
            if not self.running(node_id):
                self.start(node_id)

    def close(self) -> None:
        """Stops every node (SIGTERM, then SIGKILL) and the proxies."""
        for node_id in list(self.paused):
            self.resume(node_id)
        for proc in self._procs.values():
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
