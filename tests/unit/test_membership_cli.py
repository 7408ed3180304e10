"""The pure parts of the membership commands: peers with names, cluster.json's joined nodes,
naming new nodes, spotting a wiped data directory, a joining node's bootstrap table."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cli import processes
from cli.cluster_dir import ClusterDir, decode_spec, encode_spec
from cli.node_cmd import parse_peer
from kvstore.config import Member, NodeConfig
from kvstore.node.kv_node import bootstrap_table
from kvstore.node.member_table import Role


def test_peers_may_carry_names() -> None:
    assert parse_peer(None, None, ("n2=127.0.0.1:1=127.0.0.1:2", "127.0.0.1:3=127.0.0.1:4")) == (  # type: ignore[arg-type]
        Member("127.0.0.1:1", "127.0.0.1:2", "n2"), Member("127.0.0.1:3", "127.0.0.1:4", ""))
    for bad in ("=127.0.0.1:1=127.0.0.1:2", "a:b=127.0.0.1:1=127.0.0.1:2", "n2=x=y"):
        with pytest.raises(click.BadParameter):
            parse_peer(None, None, (bad,))  # type: ignore[arg-type]


def test_a_joined_node_is_recorded_and_started_with_join(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path)
    spec = cluster.create(3)
    new = cluster.new_node(spec)
    assert new.id == "n4" and new.join
    grown = decode_spec(cluster.spec_file, encode_spec(spec.__class__(
        spec.cluster_id, (*spec.nodes, new))))
    assert [n.join for n in grown.nodes] == [False, False, False, True]
    assert "--join" in processes.node_argv(cluster, grown, grown.nodes[3])
    assert "--join" not in processes.node_argv(cluster, grown, grown.nodes[0])


def test_a_new_node_never_reuses_a_removed_nodes_directory(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path)
    spec = cluster.create(3)
    cluster.node_dir("n4").mkdir()  # a node removed earlier: its data is kept
    assert cluster.new_node(spec).id == "n5"


def test_a_node_that_ran_and_lost_its_log_is_spotted(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path)
    spec = cluster.create(1)
    node = spec.nodes[0]
    cluster.prepare_node_dirs(spec)
    assert not cluster.lost_its_log(node)  # never ran: an empty data directory is right
    cluster.log_file(node.id).write_text("started\n")
    (cluster.data_dir(node) / "raft.journal").write_bytes(b"journal")
    assert not cluster.lost_its_log(node)
    (cluster.data_dir(node) / "raft.journal").unlink()
    assert cluster.lost_its_log(node)


def test_a_joining_node_is_not_in_its_own_bootstrap(tmp_path: Path) -> None:
    def config(join: bool) -> NodeConfig:
        return NodeConfig(cluster_id=1, node_id="n4", me=Member("127.0.0.1:4", "127.0.0.1:14"),
                          peers=(Member("127.0.0.1:1", "127.0.0.1:11", "n1"),),
                          data_dir=tmp_path, secret="s", join=join)

    initial, joining = bootstrap_table(config(False)), bootstrap_table(config(True))
    assert initial.role_of("127.0.0.1:4") is Role.VOTER and initial.get("127.0.0.1:4").name == "n4"  # type: ignore[union-attr]
    assert joining.get("127.0.0.1:4") is None and joining.voters == {"127.0.0.1:1"}
