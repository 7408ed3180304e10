"""Real network hosts: nodes in network namespaces of their own, each with its own address.

As root with ``ip netns`` (Debian's iproute2), ``kvstore.check.netns`` makes one namespace per
node and one for the client, joined by a bridge in a namespace of its own. These tests check
that the network is made only inside the namespaces and removed (also on SIGTERM, and after a
SIGKILL by the next run), that its faults do what they say, that the README's three-machine
how-to works as written across the namespaces over TLS, and that ``kv check --net netns``
passes with netem faults. Without root or ``ip`` they skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import exits
from kvstore.check import netns
from kvstore.check.netns import Netem, Topology
from tests.integration.conftest import clean_env
from tests.support import wait_for

pytestmark = pytest.mark.integration

UNUSABLE = netns.unusable()
needs_netns = pytest.mark.skipif(UNUSABLE is not None, reason=f"no network namespaces: {UNUSABLE}")
README = Path(__file__).resolve().parents[2] / "README.md"
VENV_BIN = Path(sys.executable).parent
"""Where ``kv`` is: the README's commands run as ``kv ...`` with this on PATH."""
CHECK_SEED = 20261202
"""The nemesis's first fault with this seed is netem (its first draws do not depend on timing,
later ones may: whether a leader was found changes what is drawn next)."""
PORT = 7000

_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
import threading
def udp():
    while True:
        data, peer = u.recvfrom(100)
        u.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = s.accept()
    with c:
        while data := c.recv(100):
            c.sendall(data)
"""

_PROBE = """
import json, socket, sys, time
host, port, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if what == "connect":
    try:
        socket.create_connection((host, port), timeout=1).close()
        print(json.dumps("ok"))
    except OSError as exc:
        print(json.dumps(type(exc).__name__))
elif what == "rtt":
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(int(sys.argv[4])):
        t0 = time.monotonic(); s.sendall(b"x"); s.recv(1); rtts.append(time.monotonic() - t0)
    print(json.dumps(sorted(rtts)[len(rtts) // 2]))
elif what == "udp":
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.02)
    got = 0
    for i in range(int(sys.argv[4])):
        u.sendto(b"%d" % i, (host, port))
        try:
            while u.recv(100) != b"%d" % i:
                pass
            got += 1
        except OSError:
            pass
    print(json.dumps(got))
"""


# -- helpers ----------------------------------------------------------------------------------


def _skip_without_link_faults() -> None:
    """netem needs tc netem or iptables, loss needs nft (.ci/run installs them)."""
    for reason in (netns.impair_unusable(), netns.nft_unusable()):
        if reason is not None:
            pytest.skip(reason)


def _root_network_state() -> dict[str, str]:
    """What the machine's own namespace has: links, addresses, routes, firewall rules."""
    commands = {
        "links": ["ip", "-o", "link", "show"],
        "addresses": ["ip", "-o", "addr", "show"],
        "routes": ["ip", "route", "show", "table", "all"],
    }
    if shutil.which("nft"):
        commands["nft"] = ["nft", "list", "ruleset"]
    if shutil.which("iptables-save"):
        commands["iptables"] = ["iptables-save"]
    state = {}
    for name, command in commands.items():
        out = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
        state[name] = "\n".join(line for line in out.splitlines() if not line.startswith("#"))
    return state


class Echo:
    """A TCP and UDP echo server on one host of the network."""

    def __init__(self, topology: Topology, host: str) -> None:
        self.proc = subprocess.Popen(
            [*topology.exec_prefix(host), sys.executable, "-c", _ECHO, topology.address(host),
             str(PORT)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def probe(topology: Topology, src: str, dst: str, what: str, count: int = 0) -> object:
    done = subprocess.run(
        [*topology.exec_prefix(src), sys.executable, "-c", _PROBE, topology.address(dst),
         str(PORT), what, str(count)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- the network itself -----------------------------------------------------------------------


@needs_netns
def test_the_network_is_made_inside_its_namespaces_and_removed_on_the_way_out() -> None:
    before = _root_network_state()
    with netns.network(3) as topology:
        present = set(netns.list_namespaces())
        assert set(topology.namespaces) <= present
        for host in topology.hosts.values():
            links = subprocess.run(["ip", "-n", host.netns, "-o", "link", "show"],
                                   capture_output=True, text=True, check=True).stdout
            assert sorted(re.findall(r"^\d+: ([^:@]+)", links, re.M)) == ["eth0", "lo"]
            routes = subprocess.run(["ip", "-n", host.netns, "route", "show"],
                                    capture_output=True, text=True, check=True).stdout
            assert "default" not in routes, "a host must reach nothing but the test network"
        echoes = [Echo(topology, name) for name in topology.node_names]
        try:
            for src in topology.hosts:
                for dst in topology.node_names:
                    if src != dst:
                        assert probe(topology, src, dst, "connect") == "ok", (src, dst)
            assert _root_network_state() == before, "the machine's own network was changed"
        finally:
            for echo in echoes:
                echo.close()
    assert not set(topology.namespaces) & set(netns.list_namespaces())
    assert _root_network_state() == before


@needs_netns
def test_sigterm_removes_the_network_and_a_killed_runs_is_swept_by_the_next() -> None:
    script = ("import sys, time\nfrom kvstore.check import netns\n"
              "with netns.network(2) as t:\n"
              "    print(' '.join(t.namespaces), flush=True)\n"
              "    time.sleep(120)\n")

    def start() -> tuple[subprocess.Popen[str], list[str]]:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert names and set(names) <= set(netns.list_namespaces())
        return proc, names

    proc, names = start()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert not set(names) & set(netns.list_namespaces()), "SIGTERM left namespaces behind"

    proc, names = start()
    proc.kill()
    proc.communicate(timeout=30)
    assert set(names) <= set(netns.list_namespaces())  # nobody could clean up after SIGKILL
    assert set(names) <= set(netns.sweep_stale())
    assert not set(names) & set(netns.list_namespaces())


@needs_netns
def test_a_partition_is_blackhole_routes_both_ways_and_heals() -> None:
    with netns.network(3) as topology:
        echoes = [Echo(topology, name) for name in topology.node_names]
        try:
            topology.partition([{"n1"}, {"n2", "n3"}])
            a1, a2, a3 = (topology.address(n) for n in ("n1", "n2", "n3"))
            assert topology.blackholes() == [("n1", a2), ("n1", a3), ("n2", a1), ("n3", a1)]
            assert probe(topology, "n2", "n1", "connect") != "ok"
            assert probe(topology, "n1", "n3", "connect") != "ok"
            assert probe(topology, "n2", "n3", "connect") == "ok"
            assert probe(topology, "client", "n1", "connect") == "ok"  # not in the partition
            topology.heal()
            assert topology.blackholes() == []
            assert probe(topology, "n2", "n1", "connect") == "ok"
        finally:
            for echo in echoes:
                echo.close()


@needs_netns
def test_netem_delays_both_directions_of_a_link_and_loss_drops_a_share_of_its_packets() -> None:
    _skip_without_link_faults()
    with netns.network(1) as topology:
        echo = Echo(topology, "n1")
        try:
            assert probe(topology, "client", "n1", "rtt", 10) < 0.02
            how = topology.impair("n1", Netem(delay_ms=50), seed=1)
            assert how == netns.netem_backend()
            rtt = probe(topology, "client", "n1", "rtt", 10)
            assert 0.095 < rtt < 0.3, f"50 ms each way ({how}), but a round trip took {rtt}"  # type: ignore[operator]
            topology.unimpair("n1")
            assert probe(topology, "client", "n1", "rtt", 10) < 0.02

            topology.impair("n1", Netem(delay_ms=1, loss_percent=50), seed=2)
            got = probe(topology, "client", "n1", "udp", 200)
            assert 20 < got < 100, f"50% each way lets about 50 of 200 echoes back, not {got}"  # type: ignore[operator]
            topology.unimpair("n1")

            topology.drop("n1", 50)
            got = probe(topology, "client", "n1", "udp", 200)
            assert 20 < got < 100, f"nftables 50% each way: about 50 of 200 back, not {got}"  # type: ignore[operator]
            topology.heal()
            assert probe(topology, "client", "n1", "udp", 100) == 100
        finally:
            echo.close()


# -- the README's three machines, on three namespaces -----------------------------------------


def _howto_blocks() -> list[str]:
    """The three ``sh`` blocks of the README's "Three machines with certificates"."""
    text = README.read_text()
    section = text.split("### Three machines with certificates", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "the how-to has a workstation, a node and a client block"
    return blocks


def _for_node(command: str, k: int) -> str:
    """n1's command for node ``k``: its id, addresses and files swapped with n1's."""
    swap = {"10.0.0.1": f"10.0.0.{k}", f"10.0.0.{k}": "10.0.0.1", "n1": f"n{k}", f"n{k}": "n1"}
    return re.sub("|".join(re.escape(w) for w in swap), lambda m: swap[m.group(0)], command)


def _lines(block: str) -> list[str]:
    """A block's commands, continuation lines joined, comments kept (sh ignores them)."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@needs_netns
def test_the_readme_three_machine_howto_runs_as_written_on_three_namespaces(tmp_path: Path) -> None:
    workstation, node_block, client_block = _howto_blocks()
    with netns.network(3) as topology:
        prefix = topology.address("n1").rsplit(".", 1)[0] + "."

        def real(line: str) -> str:
            return line.replace("10.0.0.", prefix).replace("/var/lib/kv/", f"{tmp_path}/var/")

        env = clean_env(PATH=f"{VENV_BIN}:{os.environ['PATH']}")
        desk = tmp_path / "workstation"
        desk.mkdir()
        for line in _lines(workstation):
            done = subprocess.run(["sh", "-c", real(line)], cwd=desk, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (line, done.stderr)
        assert (desk / "secret").stat().st_mode & 0o077 == 0

        procs = []
        try:
            for k, name in enumerate(topology.node_names, 1):
                machine = tmp_path / name  # what was copied to the machine, nothing else
                machine.mkdir()
                for f in ("secret", "pki/ca.pem", f"pki/{name}.pem", f"pki/{name}-key.pem"):
                    shutil.copy2(desk / f, machine / Path(f).name)
                (command,) = _lines(node_block)
                command = real(_for_node(command, k))
                assert f"--id {name} " in command and topology.address(name) in command
                if k == 1:  # on its own address, a node without the three TLS files refuses
                    plain = re.sub(r" --cert \S+ --key \S+ --cacert \S+", "", command)
                    plain = plain.replace(f"{tmp_path}/var/n1", f"{tmp_path}/plain")
                    done = subprocess.run([*topology.exec_prefix(name), "sh", "-c", plain],
                                          cwd=machine, env=env, capture_output=True, text=True,
                                          timeout=60)
                    assert done.returncode == exits.INVALID_INPUT, (plain, done.stderr)
                    assert "without TLS" in done.stderr and "Traceback" not in done.stderr
                procs.append(subprocess.Popen(
                    [*topology.exec_prefix(name), "sh", "-c", f"exec {command}"], cwd=machine,
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

            exports, commands = [], []
            for line in _lines(client_block):
                (exports if line.startswith("export ") else commands).append(real(line))

            def client(line: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*topology.exec_prefix(netns.CLIENT), "sh", "-c",
                     "; ".join([*exports, line])], cwd=desk, env=env, capture_output=True,
                    text=True, timeout=60)

            put_get, member_list, status, ro_get, ro_put, flags_get = commands
            wait_for(lambda: client(put_get).returncode == 0, 60,
                     "the three namespaced nodes to take a write over TLS")
            done = client(put_get)
            assert (done.returncode, done.stdout) == (0, "OK\ngreeting\nhello\n"), done.stderr
            done = client(member_list)
            assert done.returncode == 0, done.stderr
            for name in topology.node_names:
                assert f"{topology.address(name)}:2380" in done.stdout, done.stdout
            done = client(status)
            assert done.returncode == 0 and done.stdout.count("leader") == 1, done.stdout
            assert client(ro_get).stdout == "greeting\nhello\n"
            done = client(ro_put)
            assert done.returncode == exits.ACCESS_DENIED, (done.returncode, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
            done = client(flags_get)
            assert (done.returncode, done.stdout) == (0, "greeting\nhello\n"), done.stderr
            # Without a certificate the API gives nothing, even to a client on the network.
            done = subprocess.run(
                [*topology.exec_prefix(netns.CLIENT), "kv", "--endpoints",
                 f"{topology.address('n1')}:2379", "--cacert", "pki/ca.pem", "get", "greeting"],
                cwd=desk, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == exits.ACCESS_DENIED, (done.returncode, done.stderr)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    out, _ = proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                print(out.decode(errors="replace")[-2000:])
    assert not set(topology.namespaces) & set(netns.list_namespaces())


# -- kv check --net netns ---------------------------------------------------------------------


def _kv_check(report: Path, *args: str, timeout: float = 120) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "check", "-w", "json", "--net", "netns", "--seed",
         str(CHECK_SEED), "--report", str(report), *args],
        capture_output=True, text=True, env=clean_env(), timeout=timeout)
    print(done.stdout, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout.splitlines()[0]), done.stderr


@needs_netns
def test_kv_check_net_netns_passes_under_netem_loss_partitions_and_kills(tmp_path: Path) -> None:
    _skip_without_link_faults()
    started = time.monotonic()
    before = set(netns.list_namespaces())
    code, summary, _ = _kv_check(tmp_path / "report", "--faults", "partition,netem,loss,kill",
                                 "--duration", "20s")
    assert summary["verdict"] == "valid" and code == 0, summary
    assert str(summary["net"]).startswith(f"netns, {netns.SUPERNET}.")
    injected = summary["faults_injected"]
    assert isinstance(injected, dict) and injected.get("netem", 0) >= 1, injected
    assert sum(injected.values()) >= 3, injected  # about 6 in 20 s; fewer would mean little
    assert summary["ops_ok"] > 500  # type: ignore[operator]
    faults = json.loads((tmp_path / "report" / "faults.json").read_text())
    assert all(f["end_ns"] is not None for f in faults), "every fault was healed"
    assert set(netns.list_namespaces()) <= before, "kv check left namespaces behind"
    print(f"kv check --net netns took {time.monotonic() - started:.0f} s")


def test_kv_check_net_netns_without_root_says_why(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to run as another user")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        reach = subprocess.run([*prefix, sys.executable, "-c", "import cli"], cwd="/",
                               capture_output=True, text=True, env=clean_env(), timeout=60)
        if reach.returncode != 0:  # e.g. a checkout in a directory only root may enter
            why = (reach.stderr.strip().splitlines() or [f"exit {reach.returncode}"])[-1]
            pytest.skip(f"the checkout cannot be read as user 65534: {why}")
    else:
        prefix = []
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "cli", "check", "--net", "netns", "--duration", "1s",
         "--report", str(tmp_path / "r")], capture_output=True, text=True,
        env=clean_env(HOME=str(tmp_path)), timeout=60, cwd="/")
    assert done.returncode == exits.ERROR, done
    assert "kv check --net netns cannot run here: network namespaces need root" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_netns_faults_need_net_netns() -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "check", "--faults", "netem",
                           "--duration", "1s"], capture_output=True, text=True,
                          env=clean_env(), timeout=60)
    assert done.returncode != 0
    assert "the netem fault needs a real network: add --net netns" in done.stderr


@needs_netns
def test_sigterm_to_kv_check_net_netns_stops_its_nodes_and_removes_its_network(
        tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "check", "--net", "netns", "--faults", "partition",
         "--duration", "60s", "--report", str(tmp_path / "report")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        def nodes_running() -> list[str]:
            mine = [ns for ns in netns.list_namespaces()
                    if ns.startswith(f"{netns.PREFIX}-{proc.pid}-")]
            running = [ns for ns in mine if ns.endswith(("-n1", "-n2", "-n3"))
                       and netns.namespace_pids(ns)]
            return mine if len(running) == 3 else []

        names = wait_for(nodes_running, 60, "kv check to start its three nodes")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == exits.INTERRUPTED, stderr
    assert "Traceback" not in stderr, stderr
    assert not set(names) & set(netns.list_namespaces()), "SIGTERM left namespaces behind"
