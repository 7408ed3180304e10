"""Our cluster as a benchmark target: a fresh local one, or an existing one (``--endpoints``).

A fresh cluster is started exactly as a user would, ``python -m cli cluster up --detach`` in a
temporary directory, and brought down with ``kv cluster down`` at the end (then any node still
running is SIGKILLed and the directory removed).

The nodes of a detached cluster are nobody's children: if ``kv bench`` itself is SIGKILLed, the
guard process (``guard.py``) brings them down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli import processes
from cli.bench.common import Progress, RunResult, RunSpec, client_tls
from cli.bench.guard import Guard
from cli.bench.load import WorkerPool
from cli.cluster_dir import ClusterDir
from cli.exits import ERROR, UNAVAILABLE, CliError
from kvstore.node.timers import SHIPPED

START_TIMEOUT = 90.0


def _kv(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m cli ARGS`` without the user's ``KV_*`` settings (they name their cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


class OursTarget:
    """Our cluster. A fresh one is mutual TLS like any ``kv cluster up`` unless ``tls`` is false
    (``--compare plaintext``: a second cluster, without TLS, named ``ours-plaintext``); an
    existing one is dialled with ``tls_files`` (CA, certificate, key; ``None``: plaintext)."""

    def __init__(self, pool: WorkerPool, *, nodes: int, endpoints: Sequence[str] = (),
                 fsync: bool = True, sessions: bool = True, dial_timeout: float = 2.0,
                 tls: bool = True, tls_files: tuple[str | None, ...] | None = None,
                 name: str = "ours", preload: int = 0, client: str = "sync",
                 streaming: bool = True) -> None:
        self.name = name
        self.streaming = streaming
        """Whether the client's proposals travel on ``ProposeStream`` (else in calls)."""
        self.tls = tls
        self.tls_files = tls_files
        self.pool = pool
        self.client = client
        """``sync`` (kvstore.client.Client) or ``aio`` (kvstore.aio.Client:
        ``load.AioOursDriver``)."""
        self.preload = preload
        self.nodes = nodes
        self.given_endpoints = list(endpoints)
        self.fsync = fsync
        self.sessions = sessions
        self.dial_timeout = dial_timeout
        self.endpoints: list[str] = list(endpoints)
        self.cluster_id: int | None = None
        self.pids: list[int] = []
        self._tmp: Path | None = None
        self.guard: Guard | None = None

    @property
    def cluster_dir(self) -> ClusterDir | None:
        return ClusterDir(self._tmp / "cluster") if self._tmp else None

    def start(self) -> None:
        self._start()
        if self.preload:
            from cli.bench.preload import preload
            from kvstore.client import Client

            with Client(self.endpoints, timeout=120, dial_timeout=self.dial_timeout) as client:
                preload(client, self.preload)

    def _start(self) -> None:
        if self.given_endpoints:
            self._attach()
            return
        self._tmp = Path(tempfile.mkdtemp(prefix=f"kv-bench-{self.name}-"))
        cluster = self.cluster_dir
        assert cluster is not None
        if self.guard is not None:
            self.guard.register("ours", self._tmp)
        args = ["cluster", "up", "--detach", "--dir", str(cluster.path), "--nodes", str(self.nodes)]
        args.append("--fsync" if self.fsync else "--no-fsync")
        if not self.tls:
            args.append("--no-tls")
        try:
            done = _kv(*args, timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise CliError(f"ours: 'kv cluster up' took over {START_TIMEOUT:.0f}s",
                           UNAVAILABLE) from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CliError(f"ours: 'kv cluster up' failed: {last}", UNAVAILABLE)
        spec = cluster.load()
        if spec.tls:
            cert, key = cluster.certs.client_files("readwrite")
            self.tls_files = (str(cluster.certs.ca_file), str(cert), str(key))
        self.endpoints = spec.endpoints
        self.cluster_id = spec.cluster_id
        self.pids = [r.pid for r in processes.running_nodes(cluster, spec)]
        if len(self.pids) != len(spec.nodes):
            raise CliError(f"ours: only {len(self.pids)} of {len(spec.nodes)} nodes are running",
                           UNAVAILABLE)
        running_fsync = all("--fsync" in processes.command_line(pid) for pid in self.pids)
        if running_fsync != self.fsync:
            raise CliError(f"ours: asked for fsync {'on' if self.fsync else 'off'}, but the nodes "
                           f"run with it {'on' if running_fsync else 'off'}", ERROR)

    def _attach(self) -> None:
        """An existing cluster: its id, and the pids of nodes that run on this machine."""
        from kvstore.client import Client
        from kvstore.errors import KVError

        with Client(self.endpoints, dial_timeout=self.dial_timeout,
                    tls=client_tls(self.tls_files)) as client:
            try:
                self.cluster_id = client.cluster_id
            except KVError as exc:
                raise CliError(f"ours: {exc}", UNAVAILABLE) from exc
            for endpoint in self.endpoints:
                try:
                    pid = client.status(endpoint).pid
                except KVError:
                    continue
                argv = processes.command_line(pid) if pid else []
                if "node" in argv and "run" in argv and endpoint in argv:
                    self.pids.append(pid)
        if len(self.pids) != len(self.endpoints):
            self.pids = []  # CPU of remote or unknown nodes: not reported rather than partial

    def run(self, spec: RunSpec, progress: Progress) -> RunResult:
        return self.run_with(spec, progress, sessions=self.sessions, streaming=self.streaming)

    def run_with(self, spec: RunSpec, progress: Progress, *, sessions: bool,
                 streaming: bool) -> RunResult:
        params: dict[str, Any] = {
            "endpoints": self.endpoints, "cluster_id": self.cluster_id,
            "sessions": sessions, "consistency": spec.consistency,
            "op_timeout": spec.op_timeout, "dial_timeout": self.dial_timeout,
            "tls_files": self.tls_files,
            "client": self.client, "streaming": streaming,
        }
        if self.pids and any(not os.path.exists(f"/proc/{pid}") for pid in self.pids):
            raise CliError("ours: a node process exited during the benchmark", ERROR)
        return self.pool.run("ours", params, spec, self.pids, progress)

    def stop(self) -> None:
        if self._tmp is None:
            return
        bring_down(self._tmp)

    def markers(self) -> list[str]:
        return [str(self._tmp)] if self._tmp else []

    def describe(self, *, sessions: bool | None = None,
                 streaming: bool | None = None) -> dict[str, object]:
        profile = SHIPPED
        sessions = self.sessions if sessions is None else sessions
        streaming = self.streaming if streaming is None else streaming
        return {
            "system": "kv (this project): PySyncObj 0.3.17 + gRPC API + exactly-once sessions",
            "nodes": len(self.endpoints),
            "cluster": "existing (--endpoints)" if self.given_endpoints else "fresh, kv cluster up",
            "endpoints": self.endpoints,
            "client": ("kvstore.client.Client (gRPC), one per worker process shared by its "
                       "client threads" if self.client == "sync"
                       else "kvstore.aio.Client (grpc.aio), one per worker process, shared by its "
                       "clients")
                      + (" (concurrent proposals travel together, "
                         + ("as messages on one ProposeStream call per node), and " if streaming
                            else "in Propose and ProposeBatch calls), and "))
                      + ("one registered session per client, proposal_completed() after each answer"
                         if sessions else "a no-op session per client (no deduplication)"),
            "timers": f"profile {profile.name!r}: our own tick loop, woken on each proposal "
                      f"(group commit); idle poll {profile.tick_period}s, heartbeat "
                      f"{profile.append_entries_period}s",
            "fsync": ("unknown (an existing cluster)" if self.given_endpoints else
                      "on: nodes run with --fsync (journal flushed before acknowledging)"
                      if self.fsync else
                      "off: nodes run with --no-fsync (journal written, not fsynced: "
                      "survives kill -9, not power loss)"),
            "api": "mutual TLS" if self.tls_files else "plaintext",
            "node_cpu": "measured" if self.pids else "not measured (nodes not on this machine)",
            "preloaded_keys": self.preload,
            "dir": str(self._tmp) if self._tmp else None,
        }


def bring_down(tmp: Path) -> None:
    """Stops the cluster in ``tmp/cluster`` (``kv cluster down``, then SIGKILL for any node still
    running) and removes ``tmp``."""
    cluster = ClusterDir(tmp / "cluster")
    try:
        if cluster.exists():
            _kv("cluster", "down", "--dir", str(cluster.path), timeout=60)
            for running in processes.running_nodes(cluster, cluster.load()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signal.SIGKILL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OursOtherwise:
    """The cluster of ``ours`` driven another way (``sessions``, ``streaming``), side by side:
    started and stopped with ``ours``, nothing of its own."""

    name = ""

    def __init__(self, ours: OursTarget, *, sessions: bool | None = None,
                 streaming: bool | None = None) -> None:
        self.ours = ours
        self.guard: Guard | None = None
        self._sessions = ours.sessions if sessions is None else sessions
        self._streaming = ours.streaming if streaming is None else streaming

    def start(self) -> None:
        pass

    def run(self, spec: RunSpec, progress: Progress) -> RunResult:
        return self.ours.run_with(spec, progress, sessions=self._sessions,
                                  streaming=self._streaming)

    def stop(self) -> None:
        pass

    def markers(self) -> list[str]:
        return []

    def describe(self) -> dict[str, object]:
        facts = self.ours.describe(sessions=self._sessions, streaming=self._streaming)
        facts["cluster"] = "the same cluster as ours"
        facts.pop("dir", None)
        return facts


class NoopSessionsView(OursOtherwise):
    """``--compare noop``: the same cluster as ``ours``, its clients with no-op sessions.

    What exactly-once costs, measured side by side: the only difference is the session (no
    registration, no deduplication, nothing cached).
    """

    name = "ours-noop"

    def __init__(self, ours: OursTarget) -> None:
        super().__init__(ours, sessions=False)


class BatchCallsView(OursOtherwise):
    """``--compare calls``: the same cluster as ``ours``, its clients' proposals in
    ``Propose``/``ProposeBatch`` calls rather than on ``ProposeStream``.

    What the stream buys, measured side by side: the batches are formed by the same rule
    (``kvstore.batching``); only how they travel differs.
    """

    name = "ours-calls"

    def __init__(self, ours: OursTarget) -> None:
        super().__init__(ours, streaming=False)
