"""Starting, finding and stopping the node processes of a local cluster.

A pid file alone cannot be trusted: after a crash or a reboot it names a process that is gone,
or worse, a pid the OS has since given to an unrelated program. So a node counts as running only
if its recorded pid is alive *and* that process's command line is this node's
(``node run --id ID ... --data-dir DIR``). A zombie (exited, not yet reaped) has an empty
command line and so counts as gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cli.cluster_dir import ClusterDir, ClusterSpec, NodeSpec

START_MARKER = "--- kv cluster up: starting"
"""Written to a node's log before each start, so a failure shows only that start's lines."""

STOP_GRACE = 10.0
"""Seconds a node gets to stop after SIGTERM before it is killed."""

APART = {"process_group": 0}
"""How a cluster member's process is started (ours, and etcd's and plain PySyncObj's in
``kv bench``): in a process group of its own, so a Ctrl-C typed at the terminal reaches the
command that started it only (which stops the members in order, instead of every one dying at
once mid-write), and a terminal that closes sends it no SIGHUP.

Not in a session of its own (``setsid``), as it was: Linux's autogroup
(``kernel.sched_autogroup_enabled``, on by default) shares the cores between sessions before
threads, and three members in three sessions on a busy 2-core machine made each Raft thread
wait for a core 100-200 ms at a time, its own work a few milliseconds of that (issue 9, the
100 ms tick budget). With all of them in one session, as with autogroup off, no pass but one
garbage collection went over 100 ms (``benchmarks/big_state.py``, README: Performance)."""


def node_argv(cluster: ClusterDir, spec: ClusterSpec, node: NodeSpec,
              extra_args: Sequence[str] = ()) -> list[str]:
    """The command that runs ``node``: ``python -m cli node run ...``.

    The secret is passed as a file name, never on the command line, where every user of the
    machine could read it (``ps``).
    """
    argv = [
        sys.executable, "-m", "cli", "node", "run",
        "--id", node.id,
        "--cluster-id", str(spec.cluster_id),
        "--raft", node.raft,
        "--api", node.api,
        "--session-capacity", str(spec.session_capacity),
        "--snapshot-count", str(spec.snapshot_count),
    ]
    for peer in spec.nodes:
        if peer.id != node.id:
            argv += ["--peer", f"{peer.id}={peer.raft}={peer.api}"]
    argv += ["--data-dir", str(cluster.data_dir(node)), "--secret-file", str(cluster.secret_file)]
    argv.append("--fsync" if spec.fsync else "--no-fsync")
    if node.join:
        argv.append("--join")  # added after the cluster was created (kv cluster add-node)
    if spec.tls:
        argv += cluster.certs.node_args(node.id)
    return argv + list(extra_args)


def start_node(cluster: ClusterDir, spec: ClusterSpec, node: NodeSpec,
               extra_args: Sequence[str] = (),
               prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Starts ``node`` in the background and records its pid; ``prefix`` runs it elsewhere
    (``ip netns exec NS``, which execs the node in place: the pid is the node's).

    The node gets a process group of its own (``APART``): a Ctrl-C typed at the terminal
    reaches ``kv cluster up`` only, and a detached node survives its terminal closing.
    """
    with open(cluster.log_file(node.id), "ab") as log:
        log.write(f"{START_MARKER} {node.id} at {time.ctime()}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [*prefix, *node_argv(cluster, spec, node, extra_args)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **APART,
        )
    cluster.write_pid(node.id, proc.pid)
    return proc


def running_pid(cluster: ClusterDir, node: NodeSpec) -> int | None:
    """The pid of ``node`` if it is running, else ``None`` (a stale pid file is ignored)."""
    pid = cluster.read_pid(node.id)
    if pid is not None and is_node_process(pid, node.id, cluster.data_dir(node)):
        return pid
    return None


def is_node_process(pid: int, node_id: str, data_dir: Path) -> bool:
    """Whether ``pid`` is alive and runs ``node run --id node_id ... --data-dir data_dir``."""
    argv = command_line(pid)
    return (
        _option(argv, "--id") == node_id
        and _option(argv, "--data-dir") == str(data_dir)
        and "node" in argv and "run" in argv
    )


def command_line(pid: int) -> list[str]:
    """The argv of a live process; empty if it is gone, a zombie, or not ours to see."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return []
        return _command_line_from_ps(pid)
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def _command_line_from_ps(pid: int) -> list[str]:
    """Without /proc (macOS): ``ps``, split on spaces, which is enough to match our options."""
    out = subprocess.run(
        ["ps", "-ww", "-o", "stat=,args=", "-p", str(pid)],
        capture_output=True, text=True, check=False,
    ).stdout.split()
    if not out or out[0].startswith("Z"):
        return []
    return out[1:]


def _option(argv: list[str], name: str) -> str | None:
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RunningNode:
    node: NodeSpec
    pid: int


def running_nodes(cluster: ClusterDir, spec: ClusterSpec) -> list[RunningNode]:
    """The nodes of ``spec`` that are running now."""
    found = []
    for node in spec.nodes:
        pid = running_pid(cluster, node)
        if pid is not None:
            found.append(RunningNode(node, pid))
    return found


def stop(cluster: ClusterDir, nodes: Sequence[RunningNode],
         grace: float = STOP_GRACE) -> dict[str, str]:
    """Stops ``nodes`` and says how each one ended: "stopped", "killed" or "still running".

    SIGTERM to all first, so they shut down in parallel; whoever is still running after
    ``grace`` seconds gets SIGKILL.
    """
    for running in nodes:
        _signal(running.pid, signal.SIGTERM)
    stubborn = wait_until_gone(cluster, nodes, grace)
    for running in stubborn:
        _signal(running.pid, signal.SIGKILL)
    survivors = wait_until_gone(cluster, stubborn, 5.0)
    outcome = {running.node.id: "stopped" for running in nodes}
    outcome.update({running.node.id: "killed" for running in stubborn})
    outcome.update({running.node.id: "still running" for running in survivors})
    return outcome


def wait_until_gone(cluster: ClusterDir, nodes: Sequence[RunningNode],
                    timeout: float) -> list[RunningNode]:
    """Waits until every process in ``nodes`` is gone; returns those still there at the deadline."""
    deadline = time.monotonic() + timeout
    remaining = list(nodes)
    while True:
        remaining = [r for r in remaining
                     if is_node_process(r.pid, r.node.id, cluster.data_dir(r.node))]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.05)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it stopped by itself meanwhile
        os.kill(pid, sig)


def last_start_log(path: Path, lines: int = 15) -> list[str]:
    """The last ``lines`` lines a node logged since it was last started (empty if no log)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return []
    logged = data.decode("utf-8", errors="replace").splitlines()
    starts = [i for i, line in enumerate(logged) if line.startswith(START_MARKER)]
    return logged[starts[-1] + 1 if starts else 0:][-lines:]
