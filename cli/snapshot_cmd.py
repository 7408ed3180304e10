"""``kv snapshot save|status|restore``: backups, as etcdctl's ``snapshot`` commands.

``save`` streams the leader's snapshot file over the API into FILE (through ``FILE.part``,
checked, then renamed: a FILE is always whole). ``restore`` makes a new local cluster directory
whose nodes start from it: the same cluster id, so the sessions in the snapshot answer retried
requests; new ports and a new secret, so it never talks to the original. What the file holds
and how a restore rewrites it is ``kvstore.backup``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from cli.cluster_dir import ClusterDir
from cli.exits import INVALID_INPUT, CliError
from cli.files import write_atomic
from cli.kv_click import KvGroup
from cli.output import Report, count, emit
from cli.params import Integer
from cli.settings import Settings, global_options
from kvstore.backup import Backup, BackupError, for_new_cluster, parse
from kvstore.config import DEFAULT_SNAPSHOT_COUNT
from kvstore.node.dump_file import FILE_NAME

SAVE_TIMEOUT = 60.0
"""``save``'s time limit when --timeout is not given: the leader may have to write a snapshot
of a large state first."""


@click.group(cls=KvGroup)
def snapshot() -> None:
    """Back up the whole state (data and sessions) and restore it into a new cluster."""


@snapshot.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@global_options
def save(file: Path) -> None:
    """Saves a consistent snapshot, taken by the leader, to FILE.

    It covers every write acknowledged before the command started, with the sessions and their
    cached answers. --timeout defaults to 60s here.
    """
    settings = Settings.current()
    part = file.with_name(file.name + ".part")
    timeout = settings.timeout if "timeout" in settings.chosen else SAVE_TIMEOUT
    try:
        with settings.client() as client, open(part, "wb") as out:
            client.snapshot(out, timeout=timeout)
            out.flush()
            os.fsync(out.fileno())
        saved = _read(part, str(file))  # what arrived is checked before it takes FILE's name
        os.replace(part, file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    facts = {"file": str(file), **saved.describe()}
    line = (f"saved snapshot of cluster {saved.cluster_id} at index {saved.index} to {file}: "
            f"{count(len(saved.state.data), 'key')}, "
            f"{count(len(saved.state.sessions), 'session')}, digest {saved.digest}, "
            f"{count(saved.size, 'byte')}")
    emit(Report(facts, list(facts), [[str(v) for v in facts.values()]], [line]),
         settings.write_out)


@snapshot.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@global_options
def status(file: Path) -> None:
    """Checks FILE and prints what it holds: cluster id, index, term, digest, keys, sessions."""
    facts = _read(file, str(file)).describe()
    emit(Report(facts, ["field", "value"], [[k, str(v)] for k, v in facts.items()],
                [f"{k}: {v}" for k, v in facts.items()]),
         Settings.current().output_format(terminal="table"))


@snapshot.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--nodes", type=Integer(min=1), metavar="N",
              help="Nodes of the new cluster [default: as many as the snapshot's cluster had].")
@click.option("--snapshot-count", type=Integer(min=1), default=DEFAULT_SNAPSHOT_COUNT,
              show_default=True, metavar="N", help="Log entries between snapshots.")
@click.option("--tls/--no-tls", default=True, show_default=True,
              help="Client API over mutual TLS, with new certificates (as kv cluster up).")
@global_options
def restore(file: Path, nodes: int | None, snapshot_count: int, tls: bool) -> None:
    """Creates a new local cluster in --dir whose nodes start from the snapshot in FILE.

    \b
    The cluster keeps its id, so its sessions answer retried requests as before; it gets new
    ports and a new secret. Start it with: kv cluster up --detach --dir DIR
    Stop using the original cluster: both would accept the same sessions.
    """
    settings = Settings.current()
    backup = _read(file, str(file))
    target = settings.cluster
    _require_new(target, backup)
    spec = target.create(nodes or len(backup.members) or 3, cluster_id=backup.cluster_id,
                         session_capacity=backup.session_capacity, snapshot_count=snapshot_count,
                         tls=tls)
    target.prepare_node_dirs(spec)
    installed = for_new_cluster(backup, [node.raft for node in spec.nodes])
    for node in spec.nodes:
        write_atomic(target.data_dir(node) / FILE_NAME, installed)
    emit(Report({"dir": str(target.path), "cluster_id": spec.cluster_id, "index": backup.index,
                 "digest": backup.digest, "nodes": len(spec.nodes)},
                ["dir", "cluster id", "index", "digest", "nodes"],
                [[str(target.path), str(spec.cluster_id), str(backup.index), backup.digest,
                  str(len(spec.nodes))]],
                [f"restored cluster {spec.cluster_id} at index {backup.index} (digest "
                 f"{backup.digest}) into {target.path}: {count(len(spec.nodes), 'node')}",
                 f"start it with: kv cluster up --detach --dir {target.path}"]),
         settings.write_out)


def _read(path: Path, name: str) -> Backup:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"no snapshot file at {name}", INVALID_INPUT) from None
    try:
        return parse(data, name)
    except BackupError as exc:
        raise CliError(str(exc), INVALID_INPUT) from None


def _require_new(target: ClusterDir, backup: Backup) -> None:
    """A restore makes a new cluster: it never overwrites one, nor mixes with other files."""
    if target.exists():
        existing = target.load().cluster_id
        other = ("the same cluster" if existing == backup.cluster_id
                 else f"cluster {existing}; the snapshot is of cluster {backup.cluster_id}")
        raise CliError(f"{target.path} already holds {other}: restore creates a new cluster "
                       "directory (choose another --dir)", INVALID_INPUT)
    if target.path.exists() and any(target.path.iterdir()):
        raise CliError(f"{target.path} is not empty: restore creates a new cluster directory "
                       "(choose another --dir)", INVALID_INPUT)
