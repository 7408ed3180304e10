"""``kv check --faults membership``: the cluster changes shape under the workloads and every
checker still passes; and the fault-proxy network follows the member set.

Claims: a short run on a preloaded state adds a learner, promotes it and removes a voter (one
change at a time, Raft thesis 4.1), records each change for the report, and ends valid: linearizable registers,
list-appends without loss or duplicate, counters in bounds, the current members converged, and
those members are exactly the nodes the harness runs (removed ones stopped). A node that joins
gets proxies on all its links and, since only the larger address dials, must sort last.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cli.check_cluster import CheckCluster, _port_after
from cli.ports import free_ports
from kvstore.check.proxy import LinkProxy, Network
from kvstore.client import Client
from tests.integration.test_check import kv_check
from tests.support import wait_for

pytestmark = pytest.mark.integration

RUN_SECONDS = "15s"
PRELOAD = 20_000
"""Keys loaded first (``--preload``): the snapshots taken in the run, and sent to the added
nodes, hold them."""
MEMBERSHIP_SEED = 6
"""Its first three membership changes are add, promote, remove the leader, whichever node
leads (tests/unit/test_check_membership_plan.py replays the plan); they take about 8 s."""


def test_a_run_with_membership_changes_adds_promotes_removes_and_passes(tmp_path: Path) -> None:
    code, summary, _ = kv_check(tmp_path / "report", "--faults", "membership",
                                "--duration", RUN_SECONDS, "--preload", str(PRELOAD),
                                seed=MEMBERSHIP_SEED)
    assert summary["verdict"] == "valid", summary
    assert code == 0
    assert summary["preloaded_keys"] == PRELOAD
    snapshots = summary["snapshots"]
    assert isinstance(snapshots, dict) and sum(snapshots["written"].values()) >= 1, snapshots
    added = [n for n in snapshots["loaded"] if n not in ("n1", "n2", "n3")]
    assert any(snapshots["loaded"][n] >= 1 for n in added), "no node joined by a snapshot"
    changes = summary["membership_changes"]
    assert isinstance(changes, dict)
    assert changes["add"] >= 1 and changes["promote"] >= 1 and changes["remove"] >= 1, changes
    assert changes["remove-leader"] >= 1, changes
    assert summary["violations"]["membership"] == 0  # type: ignore[index]
    faults = json.loads((tmp_path / "report" / "faults.json").read_text())
    made = [f for f in faults if f["kind"] == "membership" and not f["failed"]]
    assert {f["change"] for f in made} == {"add", "promote", "remove"}
    assert all(f["end_ns"] > f["start_ns"] for f in made)
    page = (tmp_path / "report" / "report.html").read_text()
    assert 'class="fault membership"' in page


def test_a_node_that_joins_gets_proxies_on_all_its_links_and_must_sort_last() -> None:
    ports = sorted(free_ports(3))
    nodes = [f"127.0.0.1:{p}" for p in ports]
    with Network(nodes) as network:
        joiner = f"127.0.0.1:{_port_after(network.nodes)}"
        assert joiner > max(nodes)
        with pytest.raises(ValueError, match="must sort after"):
            network.add_node(nodes[0].rsplit(":", 1)[0] + ":1")  # ":1" < every other
        network.add_node(joiner)
        assert set(network.dial_via(joiner)) == set(nodes)
        assert all(joiner in network.dial_via(n) for n in nodes)
        network.partition([{joiner, nodes[0]}, set(nodes[1:])])
        assert _dial(network.link(joiner, nodes[0])) == "forwarded"
        assert _dial(network.link(joiner, nodes[1])) == "cut"
        assert _dial(network.link(nodes[2], joiner)) == "cut"
        network.remove_node(nodes[0])
        assert nodes[0] not in network.nodes
        assert set(network.dial_via(joiner)) == set(nodes[1:])
        network.partition([{joiner}, set(nodes[1:])])  # the removed node need not be placed
        with pytest.raises(KeyError):
            network.link(nodes[1], nodes[0])
        with pytest.raises(ValueError):
            network.dial_via(nodes[0])


def _dial(proxy: LinkProxy) -> str:
    """What the proxy does with a new connection: ``cut`` (closed at once) or ``forwarded`` (to
    its target, where nothing listens here, so it is closed as unreachable)."""
    before = proxy.stats()
    host, port = proxy.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as conn:
        conn.settimeout(2)
        assert conn.recv(1) == b""  # closed either way

    def outcome() -> str | None:
        after = proxy.stats()
        if after.refused > before.refused:
            return "cut"
        if after.unreachable > before.unreachable:
            return "forwarded"
        return None

    return wait_for(outcome, 5, "the proxy to close the connection")


def test_the_harness_follows_a_new_node_and_a_removed_one(tmp_path: Path) -> None:
    """No process is started: ``new_node`` and ``forget`` are the bookkeeping that a change
    needs (the node in ``spec``, its proxies, every follower told the new endpoints)."""
    cluster = CheckCluster(tmp_path / "cluster", 3, snapshot_count=500)
    client = Client(cluster.endpoints)
    try:
        cluster.follow(client)
        first = cluster.spec.nodes[0]
        node = cluster.new_node()
        assert node.join and node.id == "n4" and node.raft > max(n.raft for n in cluster.spec.nodes
                                                                 if n.id != "n4")
        assert client.endpoints == cluster.endpoints and node.api in client.endpoints
        assert node.raft in cluster.network.nodes
        assert json.loads(cluster.dir.spec_file.read_text())["nodes"][-1]["id"] == "n4"
        cluster.forget(first.id)
        assert first.id not in cluster.node_ids and first.api not in client.endpoints
        assert first.raft not in cluster.network.nodes
        assert cluster.new_node().id == "n5"  # a removed node's name and directory stay its own
    finally:
        client.close()
        cluster.close()
