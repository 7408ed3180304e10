"""The rough edges a new user hit (issue 13), against real node processes on 127.0.0.1.

The tests share one three-node cluster (module scope) and use keys of their own; a test that
kills a node brings it back before it ends.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli import exits
from cli.cluster_dir import ClusterDir
from tests.integration.conftest import CLI, Cluster, clean_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def rows(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    return {str(row["endpoint"]): row for row in json.loads(proc.stdout)}


# -- 3. kv status and kv cluster status: one pair --------------------------------------------------


def test_status_and_cluster_status_show_the_same_nodes_alike(cluster: Cluster) -> None:
    cluster.run("put", "polish/status", "x", check=True)

    def agreeing() -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]] | None:
        endpoints = rows(cluster.run("status", "-w", "json", check=True))
        local = rows(cluster.run("cluster", "status", "-w", "json", check=True))
        digests = {row["digest"] for row in [*endpoints.values(), *local.values()]}
        applied = {row["applied"] for row in [*endpoints.values(), *local.values()]}
        return (endpoints, local) if len(digests) == 1 and len(applied) == 1 else None

    endpoints, local = cluster.wait_for(agreeing, 20, "both commands to show one digest")
    assert sorted(endpoints) == sorted(local) == sorted(cluster.endpoints)
    for endpoint, row in endpoints.items():
        mine = local[endpoint]
        assert row["digest"] and len(str(row["digest"])) == 16
        assert {k: mine[k] for k in ("id", "role", "term", "keys", "digest")} == {
            k: row[k] for k in ("id", "role", "term", "keys", "digest")}
        assert "pid" not in row and mine["pid"] == cluster.pid(str(mine["id"]))


def test_a_status_is_a_table_in_a_terminal(cluster: Cluster) -> None:
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run([*CLI, "cluster", "status"], stdout=terminal,
                              stderr=subprocess.PIPE, env=cluster.env, timeout=60, check=False)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other side is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    lines = shown.decode().splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[1].split() == ["|", "ID", "|", "ENDPOINT", "|", "PID", "|", "ROLE", "|", "FSYNC", "|",
                                "TERM",
                                "|", "COMMIT", "|", "APPLIED", "|", "LAG", "|", "SESSIONS", "|",
                                "KEYS", "|", "DIGEST", "|", "SNAPSHOT", "|", "TICK_GAP_MS",
                                "|", "ALARMS", "|"]
    piped = cluster.run("cluster", "status", check=True).stdout.splitlines()
    assert len(piped) == 3 and piped[0].startswith("n1, ")  # a pipe keeps the simple format


def test_a_down_node_is_unreachable_and_a_foreground_up_stops_only_what_it_started(
        cluster: Cluster) -> None:
    leader = cluster.wait_for(cluster.leader_id, 10, "a leader")
    victim = next(n for n in cluster.node_ids if n != leader)
    others = {n: cluster.pid(n) for n in cluster.node_ids if n != victim}
    cluster.kill(victim)
    gone = cluster.endpoint(victim)

    endpoints = cluster.run("status", "-w", "json")
    assert endpoints.returncode == 0
    assert rows(endpoints)[gone]["error"] == "unreachable"
    local = cluster.run("cluster", "status", "-w", "json")
    assert local.returncode == 0
    assert {k: rows(local)[gone][k] for k in ("id", "alive", "error")} == {
        "id": victim, "alive": False, "error": "not running"}
    table = cluster.run("status", "-w", "table", check=True).stdout
    assert f"| {victim} | {gone} |" in table and "unreachable |" in table
    assert "failed to connect" not in table and "UNKNOWN" not in table
    health = cluster.run("health")
    assert health.returncode == exits.ERROR
    assert one_error_line(health) == "Error: 1 of 3 endpoints is unhealthy"
    assert f"{gone} is unhealthy: unreachable" in health.stdout.splitlines()

    foreground = cluster.popen("cluster", "up")  # the directory already has two nodes running
    try:
        assert foreground.stdout is not None and foreground.stderr is not None
        assert "is up" in foreground.stdout.readline()
        cluster.wait_for(lambda: cluster.pid(victim), 10, f"{victim} to run")
        note = next(line for line in foreground.stderr if line.startswith("Running in the"))
        kept = ", ".join(sorted(others))
        assert note == (f"Running in the foreground: Ctrl-C stops {victim} (started here); "
                        f"{kept} keep running ('kv cluster down' stops every node).\n")
        foreground.send_signal(signal.SIGINT)
        _, err = foreground.communicate(timeout=30)
    finally:
        foreground.kill()
    assert foreground.returncode == 0, err
    assert f"stopped: {victim} (stopped)" in err
    assert cluster.pid(victim) is None
    assert {n: cluster.pid(n) for n in others} == others  # still running, untouched
    cluster.up()  # the module's cluster is whole again
    healthy = cluster.wait_for(lambda: cluster.run("health").returncode == 0, 20,
                               "every endpoint to be healthy again")
    assert healthy


def test_status_of_a_stopped_cluster_exits_2_saying_how_to_start_it(
        own_cluster: Cluster) -> None:
    ClusterDir(own_cluster.dir).create(2)
    local = own_cluster.run("cluster", "status")
    assert local.returncode == exits.UNAVAILABLE
    assert one_error_line(local) == ("Error: no node is running (start them with 'kv cluster up "
                                     f"--detach --dir {own_cluster.dir}')")
    assert [line.rsplit(", ", 1)[1] for line in local.stdout.splitlines()] == ["not running"] * 2
    endpoints = own_cluster.run("status")
    assert endpoints.returncode == exits.UNAVAILABLE
    assert one_error_line(endpoints) == "Error: no node answered (2 asked)"
    assert [line.rsplit(", ", 1)[1] for line in endpoints.stdout.splitlines()] == [
        "unreachable"] * 2


def test_health_of_a_healthy_cluster(cluster: Cluster) -> None:
    health = cluster.wait_for(lambda: (done := cluster.run("health")).returncode == 0 and done,
                              20, "a healthy cluster")
    lines = health.stdout.splitlines()
    assert [line.split(" is ")[0] for line in lines[:3]] == cluster.endpoints
    assert all(" is healthy: took " in line for line in lines[:3])
    assert lines[3].startswith("committed a read through the log: took ")
    doc = json.loads(cluster.run("health", "-w", "json", check=True).stdout)
    assert doc["healthy"] is True and doc["read"]["ok"] is True


# -- 2. a taken Raft port --------------------------------------------------------------------------


def test_a_taken_raft_port_is_one_clean_line(own_cluster: Cluster) -> None:
    node = ClusterDir(own_cluster.dir).create(1).nodes[0]
    host, port = node.raft.rsplit(":", 1)
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        failed = own_cluster.run("cluster", "up", "--detach")
    assert failed.returncode == exits.ERROR
    started, shown, error = failed.stderr.splitlines()
    assert started.startswith("started n1 (pid ")
    assert shown == (f"  n1 | Error: cannot listen on {node.raft} (the Raft port): Address "
                     "already in use")
    assert error.startswith("Error: n1 exited with code 1 while starting (log: ")


# -- 5. writes without --session -------------------------------------------------------------------


def test_a_write_without_a_session_leaves_no_session_behind(cluster: Cluster) -> None:
    def sessions() -> int:
        leader = next(r for r in cluster.status() if r.get("role") == "leader")
        return int(leader["sessions"])  # type: ignore[call-overload]

    before = sessions()
    for _ in range(3):
        cluster.run("incr", "polish/no-session", check=True)
    assert cluster.run("get", "polish/no-session", check=True).stdout == "polish/no-session\n3\n"
    assert sessions() == before


def test_without_a_quorum_a_write_and_a_read_say_nothing_was_applied(cluster: Cluster) -> None:
    # Straight to the leader while both followers are paused: nothing can commit.
    leader_id = cluster.wait_for(cluster.leader_id, 10, "a leader")
    followers = [pid for node in cluster.spec.nodes if node.id != leader_id
                 and (pid := cluster.pid(node.id)) is not None]
    leader = cluster.endpoint(leader_id)
    for pid in followers:
        os.kill(pid, signal.SIGSTOP)
    try:
        write = cluster.run("incr", "polish/unsure", "--endpoints", leader, "--timeout", "300ms")
        read = cluster.run("get", "polish/unsure", "--endpoints", leader, "--timeout", "300ms")
    finally:
        for pid in followers:
            os.kill(pid, signal.SIGCONT)
    # Within 2 s the isolated leader steps down; a command that comes later meets no leader.
    stepped_down = f"Error: no leader reachable: {leader}: no leader at the moment (nothing was " \
        "applied)"
    assert write.returncode == exits.UNAVAILABLE, write.stderr
    assert one_error_line(write) in (
        "Error: no answer in time while opening a session for the write: nothing was applied "
        "(polish/unsure is unchanged); retry", stepped_down)
    assert read.returncode == exits.UNAVAILABLE, read.stderr
    assert one_error_line(read) in (
        "Error: no answer in time (no leader, or one that cannot reach a quorum: see 'kv "
        "status'); a read changes nothing, so retrying is safe", stepped_down)
    assert "may have been applied" not in write.stderr + read.stderr
    assert cluster.run("get", "polish/unsure").returncode == exits.ERROR


# -- 7. -w json everywhere -------------------------------------------------------------------------


def test_a_missing_key_still_prints_json(cluster: Cluster) -> None:
    missing = cluster.run("get", "polish/nokey", "-w", "json")
    assert (missing.returncode, missing.stdout) == (exits.ERROR, '{"count": 0, "kvs": []}\n')
    assert one_error_line(missing) == "Error: key not found: polish/nokey"


def test_a_limited_prefix_read_says_whether_there_is_more(cluster: Cluster) -> None:
    with cluster.client() as client:  # the setup needs no CLI
        for key in ("a", "b", "c"):
            client.put(f"polish/more/{key}".encode(), key.encode())

    def read(*args: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads(cluster.run(
            "get", "polish/more/", "--prefix", "-w", "json", *args, check=True).stdout)
        return doc

    limited = read("--limit", "2")
    assert (limited["count"], limited["more"]) == (2, True)
    keys = [kv["key"] for kv in limited["kvs"]]  # type: ignore[attr-defined]
    assert keys == ["polish/more/a", "polish/more/b"]
    assert (read("--limit", "3")["more"], read()["more"]) == (False, False)
    simple = cluster.run("get", "polish/more/", "--prefix", "--limit", "2", check=True).stdout
    assert simple.splitlines() == ["polish/more/a", "a", "polish/more/b", "b"]


# -- 9. the examples run as their headers say ------------------------------------------------------


def test_the_core_demo_and_the_embedded_node_run_from_the_repository_root() -> None:
    for example in ("core_demo.py", "embedded_node.py"):
        done = subprocess.run([sys.executable, f"examples/{example}"], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env=clean_env(),
                              check=False)
        assert done.returncode == 0, f"{example}: {done.stderr}"


def test_retry_safely_runs_against_a_cluster(cluster: Cluster) -> None:
    done = subprocess.run([sys.executable, "examples/retry_safely.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=clean_env(KV_ENDPOINTS=",".join(cluster.endpoints),
                                        **cluster.tls_variables()), check=False)
    assert done.returncode == 0, done.stderr
    assert "orders = " in done.stdout


def test_the_cli_walkthrough_cleans_up_after_itself(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = clean_env(TMPDIR=str(scratch), PATH=f"{venv_bin}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "examples/cli_walkthrough.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert list(scratch.iterdir()) == []  # the temporary cluster directory is gone
