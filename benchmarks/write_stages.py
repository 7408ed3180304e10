"""Where one write's time goes, read off the wire: ours and etcd side by side, one client.

One client in this process writes 100 B puts to the leader in a closed loop while ``tcpdump``
records the loopback packets between it and the cluster's processes (which process owns which
port comes from ``ss``). Each write is then cut into stages by the packets it causes:

* ``leader in``: the request reaches the leader -> the leader's first message to a follower
  that carries the entry (the API server, the hand-over to the Raft loop, the append);
* ``replication``: that message -> the first follower's answer (the follower's whole turn:
  read, append, sync, acknowledge; both directions of loopback);
* ``leader out``: that answer -> the reply to the client (commit, apply, answer through the
  API);
* ``client``: the reply -> the client's next request (the client library's own work at both
  ends of a call, and the loop's).

Each stage is the median over the writes of a round, then the median over rounds; the rounds of
the two systems alternate, as ``kv bench`` does. Both run at shipped settings (ours: mutual TLS
on the API, fsync on; etcd: plain HTTP, fsync on). Needs ``tcpdump`` (Debian's ``tcpdump``),
``ss`` (``iproute2``), etcd (``etcd-server``) and the right to capture on ``lo`` (root)::

    flock /tmp/kv-heavy.lock .venv/bin/python benchmarks/write_stages.py --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cli.bench.common import client_tls
from cli.bench.etcd import EtcdTarget
from cli.bench.load import make_driver
from cli.bench.ours import OursTarget
from kvstore.client import Client

VALUE_SIZE = 100
"""The put's value: a packet at least this long carries the entry (heartbeats, window updates
and acknowledgements are shorter or say nothing about the write)."""
STAGES = ("leader in", "replication", "leader out", "client")
WARM_UP = 1.0
"""Seconds of writes before the capture starts (connections made, caches warm)."""


@dataclass(frozen=True)
class Packet:
    time: float
    src_port: int
    dst_port: int
    size: int


def parse_tcpdump(lines: Iterable[str]) -> list[Packet]:
    """``tcpdump -n -tt -q`` lines (``1.5 IP 127.0.0.1.41256 > 127.0.0.1.26933: tcp 190``)."""
    packets = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "IP" or fields[-2] != "tcp":
            continue
        try:
            packets.append(Packet(float(fields[0]), int(fields[2].rpartition(".")[2]),
                                  int(fields[4].rstrip(":").rpartition(".")[2]),
                                  int(fields[-1])))
        except ValueError:
            continue
    return packets


def port_owners(ss_output: str) -> dict[int, int]:
    """Local port -> pid, from ``ss -tnpH`` (``... 127.0.0.1:5000 127.0.0.1:6000
    users:(("python3",pid=42,fd=7))``)."""
    owners = {}
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 6 or "pid=" not in fields[-1]:
            continue
        port = int(fields[3].rpartition(":")[2])
        owners[port] = int(fields[-1].split("pid=")[1].split(",")[0])
    return owners


def stages(packets: Sequence[Packet], owner: Callable[[int], int | None], client: int,
           leader: int) -> dict[str, list[float]]:
    """Each write's stages, in seconds. A write starts with a packet from the client to the
    leader that carries the value, and is counted only if it went leader -> follower ->
    leader -> client in that order; ``client`` is the time from a reply to the next write."""
    out: dict[str, list[float]] = {name: [] for name in STAGES}
    request = sent = answered = replied = None
    for p in packets:
        if p.size == 0:
            continue
        src, dst = owner(p.src_port), owner(p.dst_port)
        if src == client and dst == leader:
            if p.size >= VALUE_SIZE and request is None:
                request = p.time
                if replied is not None:
                    out["client"].append(request - replied)
                    replied = None
        elif request is None:
            continue
        elif src == leader and dst not in (client, leader, None):
            if sent is None and p.size >= VALUE_SIZE:
                sent = p.time
        elif dst == leader and src not in (client, leader, None):
            if sent is not None and answered is None:
                answered = p.time
        elif src == leader and dst == client:
            if answered is not None:
                out["leader in"].append(sent - request)
                out["replication"].append(answered - sent)
                out["leader out"].append(p.time - answered)
                replied = p.time
            request = sent = answered = None
    return out


class Capture:
    """``tcpdump`` on ``lo`` for some ports, in the background."""

    def __init__(self, ports: Iterable[int]) -> None:
        expression = "tcp and (" + " or ".join(f"port {p}" for p in sorted(set(ports))) + ")"
        self._out = tempfile.TemporaryFile("w+")  # a pipe would fill and stall tcpdump
        self._proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-tt", "-q", "-B", "16384", expression],
            stdout=self._out, stderr=subprocess.PIPE, text=True)
        assert self._proc.stderr is not None
        said = ""
        while "listening on" not in said:  # tcpdump says so once it captures
            line = self._proc.stderr.readline()
            if not line:
                raise SystemExit(f"write_stages: tcpdump did not start: {said.strip()}")
            said += line

    def stop(self) -> list[Packet]:
        # Packets still in flight are lost: the write they belong to is then seen only in part,
        # and ``stages`` does not count it.
        self._proc.terminate()
        self._proc.communicate(timeout=10)
        self._out.seek(0)
        with self._out:
            return parse_tcpdump(self._out)


@dataclass
class Round:
    stages: dict[str, float]
    """Median of each stage, in ms."""
    latency_p50: float
    """The client's own measure of a write, in ms."""
    writes: int


def one_round(driver: Any, leader: int, pids: Sequence[int], seconds: float) -> Round:
    """Writes for ``WARM_UP + seconds``, capturing the last ``seconds``."""
    state = driver.open(0)
    writes_timed: list[tuple[float, float]] = []
    """(start, duration) of each write: the writer appends, the round reads once it stopped."""
    stop = threading.Event()

    def writes() -> None:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            driver.write(state, b"stage-%d" % (i % 1000), b"v" * VALUE_SIZE)
            writes_timed.append((started, time.perf_counter() - started))
            i += 1

    writer = threading.Thread(target=writes, name="write-stages-client")
    writer.start()
    try:
        time.sleep(WARM_UP)
        owners = port_owners(subprocess.run(["ss", "-tnpH"], capture_output=True, text=True,
                                            check=True).stdout)
        ours = {port for port, pid in owners.items() if pid in (*pids, os.getpid())}
        capture = Capture(ours)
        captured_from = time.perf_counter()
        time.sleep(seconds)
        packets = capture.stop()
    finally:
        stop.set()
        writer.join(30)
        driver.close(state)
    latencies = [took for started, took in writes_timed if started >= captured_from]
    cut = stages(packets, owners.get, os.getpid(), leader)
    if not cut["leader in"]:
        raise SystemExit("write_stages: no write seen on the wire (is the capture allowed?)")
    return Round({name: statistics.median(v) * 1e3 for name, v in cut.items() if v},
                 statistics.median(latencies) * 1e3, len(cut["leader in"]))


def our_leader(target: OursTarget) -> int:
    with Client(target.endpoints, tls=client_tls(target.tls_files)) as client:
        for endpoint in target.endpoints:
            status = client.status(endpoint)
            if status.role == "leader":
                return status.pid
    raise SystemExit("write_stages: our cluster has no leader")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="captured per round")
    args = parser.parse_args()
    for tool in ("tcpdump", "ss", "etcd"):
        if shutil.which(tool) is None:
            sys.exit(f"write_stages: needs {tool} on PATH (Debian: tcpdump, iproute2, "
                     "etcd-server)")
    ours = OursTarget(None, nodes=3)  # type: ignore[arg-type]  # no worker pool: we drive it
    etcd = EtcdTarget(None, members=3)  # type: ignore[arg-type]
    results: dict[str, list[Round]] = {"ours": [], "etcd": []}
    try:
        ours.start()
        etcd.start()
        base = {"consistency": "l", "op_timeout": 5.0}
        drivers = {
            "ours": make_driver("ours", {**base, "endpoints": ours.endpoints,
                                         "cluster_id": ours.cluster_id, "sessions": True,
                                         "dial_timeout": 2.0, "tls_files": ours.tls_files}),
            "etcd": make_driver("etcd", {**base, "endpoint": etcd.current_leader()}),
        }
        etcd_pids = [p.pid for p in etcd._procs]
        for r in range(args.rounds):
            for name in ("ours", "etcd"):
                if name == "ours":
                    leader, pids = our_leader(ours), ours.pids
                else:
                    leader = etcd_pids[etcd.client_urls.index(etcd.current_leader())]
                    pids = etcd_pids
                result = one_round(drivers[name], leader, pids, args.seconds)
                results[name].append(result)
                print(f"round {r + 1}/{args.rounds} {name}: {result.writes} writes, client p50 "
                      f"{result.latency_p50:.2f} ms, " + ", ".join(
                          f"{s} {result.stages.get(s, float('nan')):.2f}" for s in STAGES),
                      flush=True)
    finally:
        ours.stop()
        etcd.stop()
    report(results)


def report(results: dict[str, list[Round]]) -> None:
    def med(name: str, stage: str | None) -> float:
        return statistics.median(r.latency_p50 if stage is None else r.stages.get(stage, 0.0)
                                 for r in results[name])

    print(f"\nmedians of {len(results['ours'])} rounds, ms (one client, 100 B puts)")
    print(f"{'stage':<22}{'ours':>8}{'etcd':>8}{'ours-etcd':>11}")
    rows: list[tuple[str, str | None]] = [(s, s) for s in STAGES]
    for label, stage in [*rows, ("client's p50", None)]:
        a, b = med("ours", stage), med("etcd", stage)
        print(f"{label:<22}{a:>8.2f}{b:>8.2f}{a - b:>+11.2f}")


if __name__ == "__main__":
    main()
