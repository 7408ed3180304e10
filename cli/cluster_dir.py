"""A local cluster's directory: what ``kv cluster up`` creates and every other command reads.

Layout::

    DIR/cluster.json    the cluster id, the node settings, and per node its id, addresses and
                    data directory
    DIR/secret          the cluster secret, mode 0600 (Raft traffic is authenticated with it)
    DIR/tls/            with TLS: the CA, node and client certificates (``cli.certs``)
    DIR/lock            locked while ``cluster up``/``cluster down`` start or stop nodes
    DIR/<id>/data/      the node's Raft log and snapshots
    DIR/<id>/node.log   the node's stdout and stderr, appended to on every start
    DIR/<id>/pid        the OS pid of the running node (stale after a crash; checked before use)

Paths inside ``cluster.json`` are relative to DIR, so the directory can be moved as a whole.
"""

from __future__ import annotations

import fcntl
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cli.certs import ClusterCerts
from cli.exits import INVALID_INPUT, CliError
from cli.files import write_atomic
from cli.ports import HOST, free_ports
from kvstore.config import DEFAULT_SNAPSHOT_COUNT
from kvstore.limits import DEFAULT_SESSION_CAPACITY

FORMAT_VERSION = 1


@dataclass(frozen=True)
class NodeSpec:
    id: str
    raft: str
    """``host:port`` where the other nodes reach its Raft port."""
    api: str
    """``host:port`` of its gRPC client API."""
    data_dir: str
    """Relative to the cluster directory."""
    join: bool = False
    """Added to a running cluster (``kv cluster add-node``): started with ``--join``, so that
    with an empty data directory it waits to be added instead of bootstrapping."""


@dataclass(frozen=True)
class ClusterSpec:
    cluster_id: int
    nodes: tuple[NodeSpec, ...]
    session_capacity: int = DEFAULT_SESSION_CAPACITY
    """Fixed for the cluster's life: every replica must evict the same session at the same
    moment, so every node gets the same capacity."""
    snapshot_count: int = DEFAULT_SNAPSHOT_COUNT
    """Log entries between snapshots, the same on every node for predictable restarts."""
    fsync: bool = True
    """Durable mode on every node (the default; ``kv cluster up --no-fsync`` turns it off)."""
    tls: bool = False
    """The client API over mutual TLS, with the certificates in ``DIR/tls`` (``kv cluster up``
    makes new clusters so unless ``--no-tls``)."""

    @property
    def endpoints(self) -> list[str]:
        return [node.api for node in self.nodes]

    def node(self, node_id: str) -> NodeSpec:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)


class ClusterDir:
    """The files of one local cluster, rooted at an absolute path."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()

    @property
    def spec_file(self) -> Path:
        return self.path / "cluster.json"

    @property
    def secret_file(self) -> Path:
        return self.path / "secret"

    @property
    def certs(self) -> ClusterCerts:
        return ClusterCerts(self.path / "tls")

    def node_dir(self, node_id: str) -> Path:
        return self.path / node_id

    def data_dir(self, node: NodeSpec) -> Path:
        return self.path / node.data_dir

    def log_file(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "node.log"

    def pid_file(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "pid"

    def exists(self) -> bool:
        return self.spec_file.is_file()

    def create(self, node_count: int, *, session_capacity: int = DEFAULT_SESSION_CAPACITY,
               snapshot_count: int = DEFAULT_SNAPSHOT_COUNT, fsync: bool = True,
               cluster_id: int | None = None, tls: bool = False) -> ClusterSpec:
        """Describes a new cluster of ``node_count`` nodes on free loopback ports and saves it.

        The cluster id is random and odd, so it is never 0 ("no cluster") and two local
        clusters never share one by accident: a session of one is refused by the other. Only a
        restore passes one (``kv snapshot restore``: the cluster lives on from its snapshot).
        The secret and the certificates are written before ``cluster.json``, so a directory with
        a description always has them.
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        ports = free_ports(2 * node_count)
        nodes = tuple(
            NodeSpec(
                id=f"n{i + 1}",
                raft=f"{HOST}:{ports[2 * i]}",
                api=f"{HOST}:{ports[2 * i + 1]}",
                data_dir=f"n{i + 1}/data",
            )
            for i in range(node_count)
        )
        spec = ClusterSpec(cluster_id=cluster_id or secrets.randbits(63) | 1, nodes=nodes,
                           session_capacity=session_capacity, snapshot_count=snapshot_count,
                           fsync=fsync, tls=tls)
        write_atomic(self.secret_file, secrets.token_hex(32).encode() + b"\n", mode=0o600)
        if tls:
            self.certs.create((node.id, node.api) for node in nodes)
        write_atomic(self.spec_file, encode_spec(spec), mode=0o644)
        return spec

    def load(self) -> ClusterSpec:
        """The cluster described in ``cluster.json``; ``CliError`` if there is none."""
        try:
            data = self.spec_file.read_bytes()
        except FileNotFoundError:
            raise CliError(
                f"no cluster in {self.path} (start one with: kv cluster up --dir {self.path})",
                INVALID_INPUT,
            ) from None
        return decode_spec(self.spec_file, data)

    def save(self, spec: ClusterSpec) -> None:
        """Rewrites ``cluster.json`` (atomically) after nodes were added or removed."""
        write_atomic(self.spec_file, encode_spec(spec), mode=0o644)

    def new_node(self, spec: ClusterSpec) -> NodeSpec:
        """A node to add: the first free name n<k> whose directory does not exist either (a
        removed node's data is kept, and must never be picked up by a newcomer), on free
        loopback ports, started with ``--join``."""
        k = 1
        while any(n.id == f"n{k}" for n in spec.nodes) or self.node_dir(f"n{k}").exists():
            k += 1
        raft, api = free_ports(2)
        return NodeSpec(id=f"n{k}", raft=f"{HOST}:{raft}", api=f"{HOST}:{api}",
                        data_dir=f"n{k}/data", join=True)

    def lost_its_log(self, node: NodeSpec) -> bool:
        """The node ran before (it has a log file) but its Raft log is gone: its disk was
        wiped. Starting it as if nothing happened could lose committed writes (it forgot what
        it stored and whom it voted for): it must be replaced (remove it, add a new node)."""
        return self.log_file(node.id).exists() and not (self.data_dir(node) / "raft.journal").exists()

    def prepare_node_dirs(self, spec: ClusterSpec) -> None:
        for node in spec.nodes:
            self.data_dir(node).mkdir(mode=0o700, parents=True, exist_ok=True)

    def read_pid(self, node_id: str) -> int | None:
        """The pid recorded for the node, which may be stale: check it with ``processes``."""
        try:
            return int(self.pid_file(node_id).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def write_pid(self, node_id: str, pid: int) -> None:
        write_atomic(self.pid_file(node_id), f"{pid}\n".encode(), mode=0o644)

    def remove_pid(self, node_id: str) -> None:
        self.pid_file(node_id).unlink(missing_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Excludes other ``cluster up``/``cluster down`` on this directory while held.

        Without it, two ``cluster up`` run at once would both find a node stopped and both
        start it.
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path / "lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield


def encode_spec(spec: ClusterSpec) -> bytes:
    doc = {
        "version": FORMAT_VERSION,
        "cluster_id": spec.cluster_id,
        "session_capacity": spec.session_capacity,
        "snapshot_count": spec.snapshot_count,
        "fsync": spec.fsync,
        "tls": spec.tls,
        "nodes": [
            {"id": n.id, "raft": n.raft, "api": n.api, "data_dir": n.data_dir}
            | ({"join": True} if n.join else {})
            for n in spec.nodes
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def decode_spec(path: Path, data: bytes) -> ClusterSpec:
    """Parses ``cluster.json``; any problem is a ``CliError`` naming the file."""
    try:
        doc = json.loads(data)
        if doc["version"] != FORMAT_VERSION:
            raise ValueError(f"format version {doc['version']}, expected {FORMAT_VERSION}")
        cluster_id, capacity, snapshots = (
            doc["cluster_id"], doc["session_capacity"], doc["snapshot_count"])
        for name, value in (("cluster_id", cluster_id), ("session_capacity", capacity),
                            ("snapshot_count", snapshots)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer")
        nodes = tuple(
            NodeSpec(id=str(n["id"]), raft=str(n["raft"]), api=str(n["api"]),
                     data_dir=str(n["data_dir"]), join=n.get("join", False) is True)
            for n in doc["nodes"]
        )
        if not nodes:
            raise ValueError("no nodes")
        fsync = doc.get("fsync", True)  # absent in files written before the durable mode
        tls = doc.get("tls", False)  # absent in files written before TLS
        if not isinstance(fsync, bool) or not isinstance(tls, bool):
            raise ValueError("fsync and tls must be true or false")
    except KeyError as exc:
        raise CliError(f"{path} is not a cluster description: no {exc}", INVALID_INPUT) from exc
    except (ValueError, TypeError) as exc:
        raise CliError(f"{path} is not a cluster description: {exc}", INVALID_INPUT) from exc
    return ClusterSpec(cluster_id=cluster_id, nodes=nodes, session_capacity=capacity,
                       snapshot_count=snapshots, fsync=fsync, tls=tls)
