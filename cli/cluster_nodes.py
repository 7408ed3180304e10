"""``kv cluster add-node`` and ``kv cluster remove-node``: grow or shrink a local cluster.

Both are the membership commands (``cli.member_cmd``) plus what a local cluster directory adds:
starting or stopping the node's process and keeping ``cluster.json`` equal to the members, so
that ``kv cluster up``, ``status`` and ``down`` and every other command see the new shape.

``add-node`` follows the order that upstream issue #89 asks for: the new node is started first
(with ``--join``: it waits, serving no one, until it is added), so its ports are bound before
any member tries to reach it; then it is added as a learner; once it has caught up with the
leader (from a snapshot and the log) it is promoted to voter, unless ``--learner``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli import member_cmd, processes
from cli.cluster_dir import ClusterDir, ClusterSpec, NodeSpec
from cli.exits import INVALID_INPUT, CliError
from cli.output import emit
from cli.settings import Settings, global_options
from kvstore import errors

if TYPE_CHECKING:
    from kvstore.client import Client
    from kvstore.proto.api_pb2 import MemberListResponse

START_TIMEOUT = 30.0
"""Seconds a new node gets to bind its ports and answer."""


@click.command("add-node")
@click.option("--learner", is_flag=True, help="Leave the new node a learner (no promotion).")
@click.option("--sync-timeout", type=click.FloatRange(min=0, min_open=True),
              default=member_cmd.DEFAULT_SYNC_TIMEOUT, show_default=True, metavar="SECONDS",
              help="How long the new node may take to catch up before it is promoted.")
@global_options
def add_node(learner: bool, sync_timeout: float) -> None:
    """Starts a new node, adds it as a learner, and promotes it once it has caught up."""
    settings = Settings.current()
    cluster_dir = settings.cluster
    with cluster_dir.lock():
        spec = cluster_dir.load()
        node = cluster_dir.new_node(spec)
        if spec.tls:
            cluster_dir.certs.issue_node(node.id, node.api)  # signed by the cluster's CA
        spec = replace(spec, nodes=(*spec.nodes, node))
        cluster_dir.save(spec)  # first: a node that runs is always in cluster.json
        cluster_dir.prepare_node_dirs(spec)

    def start() -> subprocess.Popen[bytes]:
        with cluster_dir.lock():
            proc = processes.start_node(cluster_dir, spec, node)
        click.echo(f"started {node.id} (pid {proc.pid}), raft {node.raft}, api {node.api}",
                   err=True)
        return proc

    with settings.client(spec) as client:
        try:
            listing = grow(client, node, start, cluster_dir.log_file(node.id),
                           promote=not learner, sync_timeout=sync_timeout)
        except NotAdded:
            _forget(cluster_dir, node)
            raise
    emit(member_cmd.report(listing), settings.write_out)


@click.command("remove-node")
@click.argument("node_id", metavar="NAME")
@global_options
def remove_node(node_id: str) -> None:
    """Removes NAME from the cluster (the leader included), stops it, updates cluster.json.

    Its directory is kept; a node added later never reuses it.
    """
    settings = Settings.current()
    cluster_dir = settings.cluster
    spec = cluster_dir.load()
    node = _node(spec, node_id)
    with settings.client(spec) as client:
        listing = shrink(client, node, lambda: _forget(cluster_dir, node))
    click.echo(f"stopped {node.id}; its data is kept in {cluster_dir.node_dir(node.id)}", err=True)
    emit(member_cmd.report(listing), settings.write_out)


# -- the steps, for any caller that starts and stops nodes its own way (kv check's nemesis) ------


class NotAdded(CliError):
    """The new node could not be added: it is not a member (stop it and forget it)."""


def _echo(line: str) -> None:
    click.echo(line, err=True)


def grow(client: Client, node: NodeSpec, start: Callable[[], subprocess.Popen[bytes]],
         log_file: Path, *, promote: bool, sync_timeout: float,
         note: Callable[[str], None] = _echo) -> MemberListResponse:
    """Starts ``node`` (with ``--join``), waits until it answers (its ports are bound: upstream
    issue #89), adds it as a learner, and unless ``promote`` is false promotes it once caught
    up. ``NotAdded`` if it did not become a member; ``CliError`` if it stayed a learner.
    ``note`` gets the progress lines (stderr by default)."""
    try:
        proc = start()
        _wait_answering(client, node, proc, log_file)
        member_cmd.change(lambda: client.member_add(node.id, node.raft, node.api))
    except (errors.KVError, CliError) as exc:
        raise NotAdded(f"{node.id} was not added: {exc}", exc.exit_code) from exc
    note(f"added {node.id} as a learner; it is catching up")
    if not promote:
        return client.member_list()
    try:
        listing = member_cmd.promote_when_in_sync(client, node.raft, sync_timeout)
    except (errors.KVError, CliError) as exc:
        raise CliError(f"{node.id} is a learner but was not promoted: {exc} (retry with: "
                       f"kv member promote {node.id} --wait 60)", exc.exit_code) from exc
    note(f"promoted {node.id} to voter")
    return listing


def shrink(client: Client, node: NodeSpec, stop: Callable[[], None],
           note: Callable[[str], None] = _echo) -> MemberListResponse:
    """Removes ``node`` if it is a member (the leader hands over first), then calls ``stop``."""
    listing, _ = member_cmd.members_or_local_view(client)
    if any(m.raft_address == node.raft and m.role != "removed" for m in listing.members):
        listing = member_cmd.change(lambda: client.member_remove(node.raft))
        note(f"removed {node.id} from the cluster")
    else:
        note(f"{node.id} is not a member; only stopping it")
    stop()
    return listing


def _node(spec: ClusterSpec, node_id: str) -> NodeSpec:
    try:
        return spec.node(node_id)
    except KeyError:
        raise CliError(f"no node {node_id} in this cluster (nodes: "
                       f"{', '.join(n.id for n in spec.nodes)})", INVALID_INPUT) from None


def _wait_answering(client: Client, node: NodeSpec, proc: subprocess.Popen[bytes],
                    log_file: Path) -> None:
    """Until the new node answers Status: its Raft port is bound (it binds before serving)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = processes.last_start_log(log_file)
            raise CliError(f"{node.id} exited with code {proc.returncode} while starting: "
                           f"{tail[-1] if tail else 'no log'}")
        try:
            client.status(node.api, timeout=1.0)
            return
        except errors.Unavailable:
            if time.monotonic() >= deadline:
                raise CliError(f"{node.id} did not answer within {START_TIMEOUT:g}s") from None
            time.sleep(0.1)


def _forget(cluster_dir: ClusterDir, node: NodeSpec) -> None:
    """Stops the node if it runs and drops it from cluster.json."""
    with cluster_dir.lock():
        spec = cluster_dir.load()
        running = [r for r in processes.running_nodes(cluster_dir, spec) if r.node.id == node.id]
        outcome = processes.stop(cluster_dir, running)
        if outcome.get(node.id) == "still running":
            raise CliError(f"could not stop {node.id}")
        cluster_dir.remove_pid(node.id)
        cluster_dir.save(replace(spec, nodes=tuple(n for n in spec.nodes if n.id != node.id)))
