"""``kv node run``: one node of a cluster, in the foreground (``kv cluster up`` runs these).

The node refuses to start without a cluster secret. PySyncObj unpickles whatever arrives on the
Raft port, so anyone who can reach that port could run code in the node; the secret makes the
nodes encrypt and authenticate their traffic. The secret comes from a file or from the
environment, never from the command line, where ``ps`` shows it to every user.

Likewise a node serves its client API without TLS only on a loopback address
(``NodeConfig``): ``--cert``, ``--key`` and ``--cacert`` make it mutual TLS (``kvstore.tls``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.kv_click import KvGroup
from cli.params import Integer
from kvstore.config import (
    DEFAULT_SNAPSHOT_COUNT,
    ConfigError,
    Member,
    NodeConfig,
    is_loopback,
    split_address,
)
from kvstore.limits import DEFAULT_SESSION_CAPACITY

if TYPE_CHECKING:
    from kvstore.tls import ServerTLS


def address_pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...],
                  right: str) -> list[tuple[str, str]]:
    """``LEFT=RIGHT`` options, both sides ``host:port``; a usage error names the bad one."""
    pairs = []
    for value in values:
        left, sep, right_address = value.partition("=")
        if not sep:
            raise click.BadParameter(f"{value!r} is not RAFT_HOST:PORT={right}", ctx, param)
        try:
            split_address(left)
            split_address(right_address)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx, param) from exc
        pairs.append((left, right_address))
    return pairs


def parse_peer(ctx: click.Context, param: click.Parameter,
               values: tuple[str, ...]) -> tuple[Member, ...]:
    """``[NAME=]RAFT=API`` as members (a name is anything before a second ``=``)."""
    names, pairs = [], []
    for value in values:
        parts = value.split("=")
        name = parts[0] if len(parts) == 3 else ""
        if len(parts) == 3 and (not name or ":" in name):
            raise click.BadParameter(f"{value!r} is not [NAME=]RAFT_HOST:PORT=API_HOST:PORT",
                                     ctx, param)
        names.append(name)
        pairs.append("=".join(parts[1:]) if len(parts) == 3 else value)
    return tuple(Member(raft_address=raft, api_address=api, name=name) for name, (raft, api)
                 in zip(names, address_pairs(ctx, param, tuple(pairs), "API_HOST:PORT"),
                        strict=True))


def parse_dial_via(ctx: click.Context, param: click.Parameter,
                   values: tuple[str, ...]) -> dict[str, str]:
    """``RAFT=HOST:PORT`` pairs: dial the peer known as RAFT at HOST:PORT (a fault proxy)."""
    return dict(address_pairs(ctx, param, values, "HOST:PORT"))


def read_secret(secret_file: Path | None) -> str:
    """The secret in ``--secret-file`` (without surrounding whitespace), else in ``KV_SECRET``."""
    if secret_file is None:
        return os.environ.get("KV_SECRET", "").strip()
    try:
        return secret_file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{secret_file}: a cluster secret must be UTF-8 text") from exc


def read_tls(cert_file: Path | None, key_file: Path | None,
             ca_file: Path | None) -> ServerTLS | None:
    """The API's TLS files: all three, or none (plaintext, which ``NodeConfig`` allows on
    loopback only)."""
    given = [f for f in (cert_file, key_file, ca_file) if f is not None]
    if not given:
        return None
    if cert_file is None or key_file is None or ca_file is None:
        raise ConfigError("TLS needs all of --cert, --key and --cacert (the CA of the clients' "
                          "certificates: a node always requires one)")
    from kvstore.tls import ServerTLS  # cryptography and grpc: only the node process needs them

    return ServerTLS.load(cert_file, key_file, ca_file)


def check_exposure(secret: str, addresses: list[str]) -> None:
    """Refuses to run without a secret, and says so loudly if an address is not loopback."""
    if secret:
        return
    exposed = [a for a in addresses if not is_loopback(a)]
    if exposed:
        raise ConfigError(
            f"refusing to listen on {exposed[0]} without a cluster secret: the Raft port must "
            "never be exposed without one (pass --secret-file FILE or set KV_SECRET)"
        )
    raise ConfigError(
        "a cluster secret is required, even on loopback (pass --secret-file FILE or set "
        "KV_SECRET): PySyncObj unpickles what peers send"
    )


@click.group(cls=KvGroup)
def node() -> None:
    """Run a node (kv cluster up does this for you)."""


@node.command()
@click.option("--id", "node_id", required=True, help="This node's name, e.g. n1.")
@click.option("--cluster-id", type=Integer(min=1), required=True,
              help="The cluster's id; every node of a cluster has the same.")
@click.option("--raft", required=True, metavar="HOST:PORT", help="Raft address of this node.")
@click.option("--api", required=True, metavar="HOST:PORT", help="Client API address of this node.")
@click.option("--peer", "peers", multiple=True, callback=parse_peer, metavar="[NAME=]RAFT=API",
              help="Another node's name, Raft and API addresses (repeat for each): the initial "
                   "members, or with --join the members to contact. A node whose log or "
                   "snapshot holds the member table uses that instead.")
@click.option("--join", is_flag=True,
              help="Join an existing cluster (etcd's --initial-cluster-state existing): the "
                   "node waits, serving no one, until a member adds it (kv member add); "
                   "start it first, so its ports are bound when it is added.")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the node keeps its log and snapshots.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the cluster secret [else env KV_SECRET].")
@click.option("--cert", "--cert-file", "cert_file", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="The API's TLS certificate (its host in the subject alternative names).")
@click.option("--key", "--key-file", "key_file", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path), help="The certificate's key.")
@click.option("--cacert", "--trusted-ca-file", "ca_file", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="CA whose client certificates the API accepts; clients must present one. "
                   "Without these three files the API is plaintext, allowed on loopback only.")
@click.option("--session-capacity", type=Integer(min=1), default=DEFAULT_SESSION_CAPACITY,
              show_default=True, help="Client sessions kept before the least recently used "
              "is evicted; must be the same on every node.")
@click.option("--snapshot-count", type=Integer(min=1), default=DEFAULT_SNAPSHOT_COUNT,
              show_default=True, help="Log entries after which the node snapshots its state "
              "and compacts its log.")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="Durable mode: fsync the journal before acknowledging entries, so "
                   "acknowledged writes survive power loss (a disk flush per batch). "
                   "--no-fsync is faster and loses acknowledged writes if a majority loses "
                   "power; term and vote are fsynced either way.")
@click.option("--metrics", "metrics_address", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (listed in the README). "
                   "Loopback only without TLS; with --cert, --key and --cacert it is HTTPS and "
                   "requires a client certificate from the same CA, on any address.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--dial-via", "dial_via", multiple=True, callback=parse_dial_via, hidden=True,
              metavar="RAFT=HOST:PORT", help="Connect to the peer RAFT at HOST:PORT instead: for "
              "the fault-injection harness (kvstore.check.proxy), which puts a proxy on each link.")
@click.option("--snapshots-on-tick-thread", is_flag=True, hidden=True,
              envvar="KV_SNAPSHOTS_ON_TICK_THREAD",
              help="Take and install snapshots on the Raft thread, as PySyncObj does: the "
              "control for benchmarks/big_state.py. It stalls the node at large states.")
@click.option("--planted-bug", type=click.Choice(["no-dedup"]), hidden=True,
              help="Run a state machine with a known bug (kvstore.check.planted): for showing "
              "that kv check catches it. Never in production.")
def run(node_id: str, cluster_id: int, raft: str, api: str, peers: tuple[Member, ...],
        data_dir: Path, secret_file: Path | None, cert_file: Path | None, key_file: Path | None,
        ca_file: Path | None, session_capacity: int, snapshot_count: int, join: bool, fsync: bool,
        metrics_address: str | None, log_level: str, dial_via: dict[str, str],
        snapshots_on_tick_thread: bool,
        planted_bug: str | None) -> None:
    """Runs one node until SIGTERM or Ctrl-C, then stops it cleanly."""
    secret = read_secret(secret_file)
    tls = read_tls(cert_file, key_file, ca_file)
    peer_addresses = [a for p in peers for a in (p.raft_address, p.api_address)]
    check_exposure(secret, [raft, api, *peer_addresses])
    config = NodeConfig(
        cluster_id=cluster_id,
        node_id=node_id,
        me=Member(raft_address=raft, api_address=api),
        peers=peers,
        data_dir=data_dir.absolute(),
        secret=secret,
        session_capacity=session_capacity,
        snapshot_count=snapshot_count,
        fsync=fsync,
        dial_via=dial_via,
        join=join,
        tls=tls,
        background_snapshots=not snapshots_on_tick_thread,
        metrics_address=metrics_address,
    )
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s {node_id} %(levelname)s %(name)s: %(message)s",
    )
    from kvstore.check.planted import PLANTED_BUGS
    from kvstore.server import run_node  # imports PySyncObj: only the node process needs it
    from kvstore.state_machine import StateMachine

    run_node(config, PLANTED_BUGS[planted_bug] if planted_bug else StateMachine)
