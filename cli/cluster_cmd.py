"""``kv cluster up|status|down``: a local cluster of node processes on 127.0.0.1, in one directory.

``up`` is idempotent: on a new directory it creates the cluster, on an existing one it starts
only the nodes that are not running, from their data on disk. So after a node crashed (or was
SIGKILLed in a test), one ``kv cluster up --detach`` brings it back.

In the foreground, ``up`` owns the nodes it started: Ctrl-C or SIGTERM stops them cleanly and
exits 0, and nodes that were already running (started by another ``up``) keep running. With
``--detach`` it returns as soon as a leader is elected and leaves the nodes running;
``kv cluster down`` stops them. Data is never deleted: remove the directory for that.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from cli import node_status, processes
from cli.cluster_dir import ClusterDir, ClusterSpec, NodeSpec
from cli.cluster_nodes import add_node, remove_node
from cli.exits import INTERRUPTED, INVALID_INPUT, UNAVAILABLE, CliError
from cli.kv_click import KvGroup
from cli.node_status import Target
from cli.output import Report, emit
from cli.params import Duration, Integer
from cli.settings import Settings, global_options
from kvstore.config import DEFAULT_SNAPSHOT_COUNT
from kvstore.limits import DEFAULT_SESSION_CAPACITY

DEFAULT_NODES = 3


@click.group(cls=KvGroup)
def cluster() -> None:
    """A local cluster on 127.0.0.1 kept in one directory (--dir, default ./kv-cluster)."""


cluster.add_command(add_node)
cluster.add_command(remove_node)


@cluster.command()
@click.option("--nodes", type=Integer(min=1), metavar="N",
              help=f"Number of nodes of a new cluster [default {DEFAULT_NODES}].")
@click.option("--detach", is_flag=True,
              help="Return once a leader is elected, leaving the nodes running.")
@click.option("--session-capacity", type=Integer(min=1), metavar="N",
              help=f"Sessions each node keeps (new cluster) [default {DEFAULT_SESSION_CAPACITY}].")
@click.option("--snapshot-count", type=Integer(min=1), metavar="N",
              help="Log entries between snapshots (new cluster) "
                   f"[default {DEFAULT_SNAPSHOT_COUNT}].")
@click.option("--fsync/--no-fsync", default=None,
              help="Durable mode (new cluster): nodes fsync their journal before acknowledging "
                   "entries, so acknowledged writes survive power loss [default: on]; "
                   "--no-fsync trades that for speed.")
@click.option("--tls/--no-tls", default=None,
              help="Client API over mutual TLS (new cluster): a CA, node and client "
                   "certificates in DIR/tls, found by every kv command [default: on].")
@click.option("--start-timeout", type=Duration(), default="30s", show_default=True,
              metavar="DURATION", help="How long to wait for a leader.")
@global_options
def up(nodes: int | None, detach: bool, session_capacity: int | None,
       snapshot_count: int | None, fsync: bool | None, tls: bool | None,
       start_timeout: float) -> None:
    """Creates the cluster if needed and starts every node that is not running.

    The number of nodes, the session capacity and the snapshot count are chosen when the
    cluster is created and kept in its directory; later runs reuse them. In the foreground,
    Ctrl-C stops the nodes this command started (and only those).
    """
    settings = Settings.current()
    cluster_dir = settings.cluster
    wanted = {"nodes": nodes, "session_capacity": session_capacity,
              "snapshot_count": snapshot_count, "fsync": fsync, "tls": tls}
    if detach:
        spec, started = _start(cluster_dir, wanted)
        leader = _wait_ready(settings, spec, started, time.monotonic() + start_timeout)
        _print_ready(settings, spec, leader)
        wiped = [n.id for n in spec.nodes if processes.running_pid(cluster_dir, n) is None
                 and cluster_dir.lost_its_log(n)]
        if wiped:
            raise CliError(f"not started: {', '.join(wiped)} (its Raft log is gone; see above)")
        return
    # Signals are caught before any node starts: a Ctrl-C during the start must stop the
    # nodes started so far, not leave them running in their own sessions.
    with _stop_signals() as stop:
        spec, started = _start(cluster_dir, wanted)
        try:
            leader = _wait_ready(settings, spec, started, time.monotonic() + start_timeout, stop)
            _print_ready(settings, spec, leader)
            click.echo(_foreground_note(spec, started), err=True)
            if started:
                _supervise(cluster_dir, spec, started, stop)
        finally:
            _stop_started(cluster_dir, spec, started)
            for proc in started.values():
                proc.poll()  # reap our children


@cluster.command()
@click.option("--digest/--no-digest", default=True, show_default=True,
              help="Ask each node for its state digest (it hashes the whole state: skip it on "
                   "large stores).")
@global_options
def status(digest: bool) -> None:
    """One row per node: its process, and its view of Raft and of the data.

    The columns of kv status, plus each node's pid; a table in a terminal (-w to choose).
    Exit 2 if no node answers.
    """
    settings = Settings.current()
    cluster_dir = settings.cluster
    spec = cluster_dir.load()
    with settings.client(spec) as client:
        # A digest hashes the whole state (seconds at millions of keys): the command's
        # timeout bounds it, not the dial timeout.
        rows = [node_status.probe(client, _target(cluster_dir, node), cluster_id=spec.cluster_id,
                                  with_digest=digest, timeout=settings.timeout if digest else None)
                for node in spec.nodes]
    emit(node_status.report(rows, local=True), settings.output_format(terminal="table"))
    node_status.require_an_answer(rows, f"kv cluster up --detach --dir {cluster_dir.path}")


def _target(cluster_dir: ClusterDir, node: NodeSpec) -> Target:
    return Target(node.api, node.id, processes.running_pid(cluster_dir, node), local=True)


@cluster.command()
@global_options
def down() -> None:
    """Stops every node (SIGTERM, then SIGKILL after a grace period); keeps the data."""
    cluster_dir = Settings.current().cluster
    spec = cluster_dir.load()
    with cluster_dir.lock():
        running = processes.running_nodes(cluster_dir, spec)
        outcome = _stop(cluster_dir, spec, running)
    ended = {node.id: outcome.get(node.id, "was not running") for node in spec.nodes}
    for node_id, how in ended.items():
        click.echo(f"{node_id}: {how}", err=True)
    # The lines above are progress on stderr; stdout carries the result in -w json or table.
    emit(Report({"nodes": [{"id": i, "outcome": how} for i, how in ended.items()]},
                ["id", "outcome"], [[i, how] for i, how in ended.items()], []),
         Settings.current().write_out)
    stuck = sorted(node_id for node_id, how in outcome.items() if how == "still running")
    if stuck:
        raise CliError(f"could not stop {', '.join(stuck)}")


def _load_or_create(cluster_dir: ClusterDir, wanted: dict[str, int | bool | None]) -> ClusterSpec:
    """The cluster in the directory, or a new one with the ``wanted`` settings (None: default).

    Asking an existing cluster for other settings is an error rather than silently ignored.
    """
    if not cluster_dir.exists():
        spec = cluster_dir.create(
            wanted["nodes"] or DEFAULT_NODES,
            session_capacity=wanted["session_capacity"] or DEFAULT_SESSION_CAPACITY,
            snapshot_count=wanted["snapshot_count"] or DEFAULT_SNAPSHOT_COUNT,
            fsync=wanted["fsync"] is not False,
            tls=wanted["tls"] is not False,
        )
        click.echo(f"created cluster {spec.cluster_id} in {cluster_dir.path}", err=True)
        return spec
    spec = cluster_dir.load()
    actual = {"nodes": len(spec.nodes), "session_capacity": spec.session_capacity,
              "snapshot_count": spec.snapshot_count, "fsync": spec.fsync, "tls": spec.tls}
    for name, value in wanted.items():
        if value is not None and value != actual[name]:
            raise CliError(
                f"the cluster in {cluster_dir.path} has {name.replace('_', ' ')} "
                f"{actual[name]}, not {value}: it is fixed when the cluster is created "
                "(use another --dir)",
                INVALID_INPUT,
            )
    return spec


def _start(cluster_dir: ClusterDir, wanted: dict[str, int | None],
           ) -> tuple[ClusterSpec, dict[str, subprocess.Popen[bytes]]]:
    """Creates or loads the cluster and starts the nodes that are not running."""
    with cluster_dir.lock():
        spec = _load_or_create(cluster_dir, wanted)
        cluster_dir.prepare_node_dirs(spec)
        already = {r.node.id: r.pid for r in processes.running_nodes(cluster_dir, spec)}
        wiped = [n.id for n in spec.nodes if n.id not in already and cluster_dir.lost_its_log(n)]
        started = {
            node.id: processes.start_node(cluster_dir, spec, node)
            for node in spec.nodes if node.id not in already and node.id not in wiped
        }
    for node_id, pid in already.items():
        click.echo(f"{node_id} is already running (pid {pid})", err=True)
    for node_id, proc in started.items():
        click.echo(f"started {node_id} (pid {proc.pid})", err=True)
    for node_id in wiped:
        click.echo(f"not starting {node_id}: it ran before but its Raft log is gone (a wiped "
                   "data directory); back as a member it could lose committed writes. Replace "
                   f"it: kv cluster remove-node {node_id} && kv cluster add-node", err=True)
    return spec, started


def _wait_ready(settings: Settings, spec: ClusterSpec,
                started: dict[str, subprocess.Popen[bytes]], deadline: float,
                stop: threading.Event | None = None) -> dict[str, object]:
    """Polls Status until a leader is known and every node started here answers.

    Returns the leader's status. A node that exits meanwhile fails the start.
    """
    cluster_dir = settings.cluster
    with settings.client(spec) as client:
        while True:
            for node_id, proc in started.items():
                if proc.poll() is not None:
                    _fail_start(cluster_dir, node_id, proc.returncode)
            answers = {node.id: node_status.probe(client, Target(node.api, node.id), timeout=1.0,
                                                  with_digest=False)
                       for node in spec.nodes}
            leader = next((a for a in answers.values() if a.get("role") == "leader"), None)
            if leader is not None and all("error" not in answers[n] for n in started):
                return leader
            if stop is not None and stop.is_set():
                raise CliError("interrupted before the cluster was ready", INTERRUPTED)
            if time.monotonic() >= deadline:
                raise CliError(
                    f"no leader elected in time; the nodes' logs are in "
                    f"{cluster_dir.path}/*/node.log",
                    UNAVAILABLE,
                )
            time.sleep(0.1)


def _fail_start(cluster_dir: ClusterDir, node_id: str, returncode: int) -> NoReturn:
    """Shows the end of the node's log (the cause is there: a port in use, a bad data dir)."""
    log = cluster_dir.log_file(node_id)
    for line in processes.last_start_log(log):
        click.echo(f"  {node_id} | {line}", err=True)
    raise CliError(f"{node_id} exited with code {returncode} while starting (log: {log}); "
                   "fix the cause and rerun 'kv cluster up'")


def _print_ready(settings: Settings, spec: ClusterSpec, leader: dict[str, object]) -> None:
    """The endpoints, and how to point ``kv`` at them."""
    cluster_dir = settings.cluster
    pids = {node.id: processes.running_pid(cluster_dir, node) for node in spec.nodes}
    data = {
        "cluster_id": spec.cluster_id, "dir": str(cluster_dir.path), "leader": leader["id"],
        "endpoints": spec.endpoints,
        "nodes": [{"id": node.id, "endpoint": node.api, "raft": node.raft, "pid": pids[node.id]}
                  for node in spec.nodes],
    }
    rows = [[node.id, node.api, node.raft, str(pids[node.id] or "")] for node in spec.nodes]
    simple = [
        f"cluster {spec.cluster_id} is up: {len(spec.nodes)} nodes, leader {leader['id']}",
        *(f"  {node.id}  {node.api}  pid {pids[node.id]}" for node in spec.nodes),
        "Point kv at it with:",
        f"  export KV_ENDPOINTS={','.join(spec.endpoints)}{_tls_variables(cluster_dir, spec)}",
        f"  or: export KV_CLUSTER_DIR={cluster_dir.path}",
    ]
    emit(Report(data, ["id", "endpoint", "raft", "pid"], rows, simple), settings.write_out)


def _tls_variables(cluster_dir: ClusterDir, spec: ClusterSpec) -> str:
    """The client certificate variables that go with KV_ENDPOINTS, for a TLS cluster."""
    if not spec.tls:
        return ""
    cert, key = cluster_dir.certs.client_files("readwrite")
    return f" KV_CACERT={cluster_dir.certs.ca_file} KV_CERT={cert} KV_KEY={key}"


@contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """Turns SIGINT and SIGTERM into an event, so stopping is an orderly step, not an exception
    that may land in the middle of starting a node."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _foreground_note(spec: ClusterSpec, started: dict[str, subprocess.Popen[bytes]]) -> str:
    others = [node.id for node in spec.nodes if node.id not in started]
    if not started:
        return "Every node was already running: nothing to run in the foreground."
    if not others:
        return "Running in the foreground: Ctrl-C stops the cluster."
    return (f"Running in the foreground: Ctrl-C stops {', '.join(started)} (started here); "
            f"{', '.join(others)} keep running ('kv cluster down' stops every node).")


def _supervise(cluster_dir: ClusterDir, spec: ClusterSpec,
               started: dict[str, subprocess.Popen[bytes]], stop: threading.Event) -> None:
    """Waits for a stop signal, reporting nodes that die meanwhile.

    Returns early when none of the nodes started here is running any more (for example after
    ``kv cluster down`` in another shell).
    """
    alive = {r.node.id for r in processes.running_nodes(cluster_dir, spec)}
    while not stop.wait(0.5):
        for proc in started.values():
            proc.poll()  # reap a child that died, so it does not linger as a zombie
        now = {r.node.id for r in processes.running_nodes(cluster_dir, spec)}
        for node_id in sorted(alive - now):
            click.echo(f"{node_id} stopped running; 'kv cluster up --detach --dir "
                       f"{cluster_dir.path}' restarts it", err=True)
        alive = now
        if not alive & set(started):
            click.echo("no node started here is running any more", err=True)
            return


def _stop_started(cluster_dir: ClusterDir, spec: ClusterSpec,
                  started: dict[str, subprocess.Popen[bytes]]) -> None:
    """Stops the nodes this command started, if they still run; leaves the others alone."""
    with cluster_dir.lock():
        mine = [r for r in processes.running_nodes(cluster_dir, spec)
                if r.node.id in started and r.pid == started[r.node.id].pid]
        outcome = _stop(cluster_dir, spec, mine)
    if outcome:
        click.echo("stopped: " + ", ".join(f"{i} ({how})" for i, how in sorted(outcome.items())),
                   err=True)


def _stop(cluster_dir: ClusterDir, spec: ClusterSpec,
          running: list[processes.RunningNode]) -> dict[str, str]:
    """Stops ``running`` and removes the pid file of every node that is not running after."""
    outcome = processes.stop(cluster_dir, running)
    for node in spec.nodes:
        if outcome.get(node.id) == "still running":
            continue
        if node.id in outcome or processes.running_pid(cluster_dir, node) is None:
            cluster_dir.remove_pid(node.id)
    return outcome
