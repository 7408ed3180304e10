"""A real cluster of node processes on 127.0.0.1, driven only through the ``kv`` command line.

The fixture starts it the way a user would (``kv cluster up --detach``), every test talks to it
through ``python -m cli`` subprocesses, and teardown brings it down even when a test failed,
SIGKILLing any node that did not stop. Tests wait on conditions with deadlines (``wait_for``),
never on bare sleeps.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cli import processes
from cli.cluster_dir import ClusterDir, ClusterSpec
from tests import support

if TYPE_CHECKING:
    import grpc

    from kvstore.client import Client
    from kvstore.tls import ClientTLS

CLI = [sys.executable, "-m", "cli"]
COMMAND_DEADLINE = 60.0
"""Longest any one ``kv`` command may take before the test fails (not a command timeout)."""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the developer's own ``KV_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    env.update(extra)
    return env


class Cluster:
    """A local cluster in ``dir`` and the commands to drive it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = clean_env(KV_CLUSTER_DIR=str(directory))

    @property
    def spec(self) -> ClusterSpec:
        return ClusterDir(self.dir).load()

    @property
    def endpoints(self) -> list[str]:
        return self.spec.endpoints

    @property
    def node_ids(self) -> list[str]:
        return [node.id for node in self.spec.nodes]

    def endpoint(self, node_id: str) -> str:
        return self.spec.node(node_id).api

    def tls(self, role: str = "readwrite") -> ClientTLS | None:
        """The cluster's client files for ``role`` (``None`` for a cluster without TLS)."""
        return ClusterDir(self.dir).certs.client_tls(role) if self.spec.tls else None

    def tls_variables(self) -> dict[str, str]:
        """``KV_CACERT``, ``KV_CERT`` and ``KV_KEY`` for the readwrite files (none without TLS)."""
        tls = self.tls()
        if tls is None:
            return {}
        return {"KV_CACERT": str(tls.ca_file), "KV_CERT": str(tls.cert_file),
                "KV_KEY": str(tls.key_file)}

    def client(self, endpoints: list[str] | None = None, **options: Any) -> Client:
        """A library client of this cluster, with its readwrite certificate if it has TLS."""
        from kvstore.client import Client

        return Client(endpoints or self.endpoints, tls=self.tls(), **options)

    def channel(self, endpoint: str) -> grpc.Channel:
        """A raw gRPC channel to ``endpoint``, with the readwrite certificate if TLS."""
        from kvstore.tls import open_channel

        return open_channel(endpoint, self.tls())

    def run(self, *args: str, input: str | bytes | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs ``kv ARGS`` against this cluster; output decoded as UTF-8.

        Every run also checks the CLI's promise that stderr never holds a traceback.
        """
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run([*CLI, *args], input=data, capture_output=True, env=self.env,
                              cwd=self.dir.parent, timeout=COMMAND_DEADLINE, check=False)
        done = subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))
        assert "Traceback" not in done.stderr, done.stderr
        if check and done.returncode != 0:
            raise AssertionError(f"kv {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Starts ``kv ARGS`` in the background (for commands that run until signalled)."""
        return subprocess.Popen([*CLI, *args], env=self.env, cwd=self.dir.parent,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def up(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``kv cluster up --detach``: returns once a leader is elected."""
        return self.run("cluster", "up", "--detach", *args, check=True)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.run("cluster", "down")

    def status(self) -> list[dict[str, Any]]:
        """``kv cluster status -w json``, one dict per node (exit 2, no node answering, is an
        answer too: every row then says why)."""
        done = self.run("-w", "json", "cluster", "status")
        assert done.returncode in (0, 2), done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def pid(self, node_id: str) -> int | None:
        """The node's OS pid if it is running."""
        return processes.running_pid(ClusterDir(self.dir), self.spec.node(node_id))

    def leader_id(self) -> str | None:
        leaders = [row["id"] for row in self.status() if row.get("role") == "leader"]
        return leaders[0] if leaders else None

    def kill(self, node_id: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Sends ``sig`` to the node and waits until its process is gone."""
        pid = self.pid(node_id)
        assert pid is not None, f"{node_id} is not running"
        os.kill(pid, sig)
        running = processes.RunningNode(self.spec.node(node_id), pid)
        assert not processes.wait_until_gone(ClusterDir(self.dir), [running], 15), \
            f"{node_id} (pid {pid}) still running after {sig.name}"

    def kill_stragglers(self) -> None:
        """SIGKILLs every node still running: teardown must leave no process behind."""
        cluster = ClusterDir(self.dir)
        for running in processes.running_nodes(cluster, self.spec):
            os.kill(running.pid, signal.SIGKILL)

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Polls ``predicate`` until it returns something truthy, which is returned."""
        return support.wait_for(predicate, timeout, what)


def read_line(stream: Any, timeout: float, what: str) -> str:
    """The next line of a child's output, or a failure naming ``what`` after ``timeout``
    seconds (a bare ``readline()`` would hang the run if the child never prints)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line from {what} within {timeout} s") from None


def bring_down(cluster: Cluster) -> None:
    """Stops the cluster, whatever state a test left it in, and leaves no process behind."""
    if ClusterDir(cluster.dir).exists():
        cluster.down()
        cluster.kill_stragglers()


@contextmanager
def running_cluster(directory: Path, *up_args: str) -> Iterator[Cluster]:
    """A cluster started with ``kv cluster up --detach UP_ARGS`` (``--nodes``,
    ``--snapshot-count``...) that is brought down when the block ends, even on failure."""
    started = Cluster(directory)
    try:
        started.up(*up_args)
        yield started
    finally:
        bring_down(started)


@pytest.fixture(scope="session", autouse=True)
def quiet_gc_recorder_at_exit() -> Iterator[None]:
    """Stops timing garbage collections once the session's tests are done.

    Tests that embed a node in this process install its GC recorder
    (``kvstore.node.gc_pauses``), which logs every long collection. After the last test
    pytest collects garbage several times while finishing, with no log capture left, so the
    recorder's warnings about pytest's own collections would print under the summary line.
    """
    yield
    from kvstore.node.gc_pauses import GcPauses

    gc.callbacks[:] = [hook for hook in gc.callbacks
                       if not isinstance(getattr(hook, "__self__", None), GcPauses)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-node cluster shared by the tests of a module (use distinct keys per test)."""
    with running_cluster(tmp_path_factory.mktemp("kv") / "cluster") as shared:
        yield shared


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster directory of the test's own, not started yet; brought down after the test."""
    own = Cluster(tmp_path / "own")
    try:
        yield own
    finally:
        bring_down(own)


@pytest.fixture
def single_node_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A running one-node cluster of the test's own, for tests that stop and restart it."""
    with running_cluster(tmp_path / "single", "--nodes", "1") as single:
        yield single
