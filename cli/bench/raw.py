"""A plain PySyncObj replicated dict as a benchmark target: what our layers cost on top of it.

Each node is a process (``python -m cli.bench.raw``) holding a minimal ``SyncObj`` subclass with
``@replicated set(key, value)`` (and ``get``, so that a linearizable read goes through the log as
ours does). It uses our shipped timer profile mapped to ``SyncObjConf`` the way
``kvstore/node/raft_node.py`` maps it, with one difference: a plain ``SyncObj`` cannot use our
driven tick loop (waking the tick thread on each proposal and shipping appends at once), so it
runs PySyncObj's own ``autoTick`` thread with the profile's tick period, and appends wait for
``appendEntriesPeriod``. Journal and dump files, a password (encrypted Raft traffic) and
``bindAddress`` as in ours.

PySyncObj has no client API, so the load runs inside the leader: the coordinator tells the
leader process, over its stdin, to run N client threads doing synchronous calls for the run's
window, and reads progress and the latencies back from its stdout (JSON lines). Those threads
share the leader's GIL with its tick thread. Their CPU time (``time.thread_time``) is reported
as client CPU and subtracted from the nodes' CPU.

A node exits when its stdin closes (the coordinator is gone), and has a parent-death signal.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from cli.bench.common import Progress, RunResult, RunSpec, Window, with_parent_death
from cli.bench.guard import Guard
from cli.exits import ERROR, UNAVAILABLE, CliError
from cli.ports import HOST, free_ports
from cli.processes import APART
from kvstore.config import DEFAULT_SNAPSHOT_COUNT
from kvstore.node.timers import SHIPPED, TimerProfile

SECRET_ENV = "KV_BENCH_RAW_SECRET"
START_TIMEOUT = 30.0


# -- the node process --------------------------------------------------------------------------


def sync_obj_conf(profile: TimerProfile, self_address: str, data_dir: str, password: str) -> Any:
    """``profile`` as PySyncObj settings, as ``kvstore.node.raft_node.RaftNode`` maps it, but
    with PySyncObj's own tick thread (``autoTick``) instead of our driven loop."""
    from pysyncobj import SyncObjConf

    return SyncObjConf(
        password=password,
        bindAddress=self_address,
        journalFile=os.path.join(data_dir, "raft.journal"),
        fullDumpFile=os.path.join(data_dir, "raft.dump"),
        autoTick=True,
        **profile.syncobj_settings(),
        logCompactionMinEntries=DEFAULT_SNAPSHOT_COUNT,
        logCompactionMinTime=300,
        dynamicMembershipChange=False,
    )


def _make_node(self_address: str, peers: list[str], conf: Any) -> Any:
    from pysyncobj import SyncObj, replicated

    class RawDict(SyncObj):  # type: ignore[misc]
        """PySyncObj's own example, nearly: a dict with replicated set (and get)."""

        def __init__(self) -> None:
            super().__init__(self_address, peers, conf)
            self.data: dict[bytes, bytes] = {}

        @replicated
        def set(self, key: bytes, value: bytes) -> None:
            self.data[key] = value

        @replicated
        def get(self, key: bytes) -> bytes | None:
            return self.data.get(key)

    return RawDict()


class RawDriver:
    """A client thread of the leader process: synchronous replicated calls."""

    def __init__(self, node: Any, consistency: str, timeout: float) -> None:
        self.node = node
        self.serializable = consistency == "s"
        self.timeout = timeout

    def open(self, client: int) -> Any:
        return self.node

    def write(self, node: Any, key: bytes, value: bytes) -> None:
        node.set(key, value, sync=True, timeout=self.timeout)

    def read(self, node: Any, key: bytes) -> None:
        if self.serializable:
            node.data.get(key)  # the local replica, as ours reads with --consistency s
        else:
            node.get(key, sync=True, timeout=self.timeout)  # through the log, as ours

    def recover(self, node: Any, exc: BaseException) -> Any:
        return node

    def close(self, node: Any) -> None:
        pass


def _say(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def node_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a raw PySyncObj node for kv bench")
    parser.add_argument("--self", dest="self_address", required=True)
    parser.add_argument("--peer", dest="peers", action="append", default=[])
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    password = os.environ.pop(SECRET_ENV, "")
    if not password:
        sys.exit(f"{SECRET_ENV} is not set: a raw node never runs without a password")
    os.makedirs(args.dir, exist_ok=True)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by accident goes to the log, not the protocol
    node = _make_node(args.self_address, args.peers,
                      sync_obj_conf(SHIPPED, args.self_address, args.dir, password))
    lines = iter(sys.stdin.readline, "")
    try:
        for line in lines:
            command = json.loads(line)
            if command["cmd"] == "status":
                status = node.getStatus()
                connected = sum(1 for k, v in status.items()
                                if k.startswith("partner_node_status_server_") and v == 2)
                _say(out, {"status": {"leader": bool(node._isLeader()),
                                      "has_quorum": bool(status["has_quorum"]),
                                      "connected": connected}})
            elif command["cmd"] == "load":
                _load(node, command, lines, out)
            else:
                break
    finally:
        node.destroy()


def _load(node: Any, command: dict[str, Any], lines: Any, out: IO[str]) -> None:
    from cli.bench.load import ClientLoop, run_clients

    spec = RunSpec(**command["spec"])
    driver = RawDriver(node, spec.consistency, spec.op_timeout)
    loops = [ClientLoop(driver, client, spec) for client in range(spec.clients)]
    go = threading.Event()
    threads = run_clients(loops, go)
    for loop in loops:
        loop.ready.wait(spec.op_timeout + 20)
    problems = [loop.setup_error for loop in loops if loop.setup_error]
    problems += [f"client {loop.client}: no answer" for loop in loops if not loop.ready.is_set()]
    _say(out, {"ready": problems})
    reply = json.loads(next(lines, '{"cmd": "abort"}'))
    if reply["cmd"] != "go":
        for loop in loops:
            loop.aborted = True
        go.set()
        return
    window = Window(*reply["window"])
    for loop in loops:
        loop.window = window
    go.set()
    while (now := time.monotonic()) < window.end:
        _say(out, {"progress": sum(loop.counted for loop in loops)})
        time.sleep(max(0.0, min(0.25, window.end - now)))
    for thread in threads:
        thread.join(spec.op_timeout + 5)
    result = RunResult()
    for loop in loops:
        result.merge(loop.result)
    _say(out, {"result": {
        "latencies": result.latencies, "reads": result.reads, "writes": result.writes,
        "errors": dict(result.errors), "samples": result.error_samples,
        "client_cpu": sum(loop.thread_cpu or 0.0 for loop in loops),
        "stuck": sum(1 for t in threads if t.is_alive()),
    }})


# -- the coordinator's side --------------------------------------------------------------------


class _RawNode:
    def __init__(self, proc: subprocess.Popen[str], address: str) -> None:
        self.proc = proc
        self.address = address
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                continue
        self.messages.put(None)  # EOF: the process is gone

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise CliError(f"raw: node {self.address} is gone", ERROR) from exc

    def receive(self, key: str, timeout: float) -> Any:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise CliError(f"raw: node {self.address} did not answer within {timeout:.0f}s",
                           ERROR) from None
        if message is None:
            raise CliError(f"raw: node {self.address} exited (code {self.proc.poll()})", ERROR)
        if key not in message:
            raise CliError(f"raw: node {self.address} said {message!r}, expected {key!r}", ERROR)
        return message[key]


class RawTarget:
    name = "raw"

    def __init__(self, *, nodes: int) -> None:
        self.nodes = nodes
        self._tmp: Path | None = None
        self.guard: Guard | None = None
        self._nodes: list[_RawNode] = []

    def start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="kv-bench-raw-"))
        if self.guard is not None:
            self.guard.register("dir", self._tmp)
        addresses = [f"{HOST}:{port}" for port in free_ports(self.nodes)]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("KV_")},
               SECRET_ENV: secrets.token_hex(32)}
        for i, address in enumerate(addresses):
            argv = [sys.executable, "-m", "cli.bench.raw", "--self", address,
                    "--dir", str(self._tmp / f"r{i + 1}")]
            for peer in addresses:
                if peer != address:
                    argv += ["--peer", peer]
            with open(self._tmp / f"r{i + 1}.log", "wb") as log:
                proc = subprocess.Popen(with_parent_death(argv), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                                        **APART)
            self._nodes.append(_RawNode(proc, address))
        deadline = time.monotonic() + START_TIMEOUT
        while self._leader(deadline) is None:
            time.sleep(0.1)

    def _leader(self, deadline: float) -> _RawNode | None:
        """The leader once it is connected to every peer; ``None`` while not yet."""
        leader = None
        for node in self._nodes:
            node.send({"cmd": "status"})
            status = node.receive("status", max(1.0, deadline - time.monotonic()))
            if status["leader"] and status["has_quorum"] and status["connected"] == self.nodes - 1:
                leader = node
        if leader is None and time.monotonic() > deadline:
            raise CliError(f"raw: no leader within {START_TIMEOUT:.0f}s", UNAVAILABLE)
        return leader

    def run(self, spec: RunSpec, progress: Progress) -> RunResult:
        from cli.bench.stats import CpuWindow

        deadline = time.monotonic() + 10
        while (leader := self._leader(deadline)) is None:
            time.sleep(0.1)
        leader.send({"cmd": "load", "spec": asdict(spec)})
        problems = leader.receive("ready", spec.op_timeout + 40)
        if problems:
            leader.send({"cmd": "abort"})
            raise CliError(f"raw: clients could not start: {problems[0]}", UNAVAILABLE)
        window = Window.after_now(spec)
        leader.send({"cmd": "go", "window": [window.start, window.measure, window.end]})
        cpu = CpuWindow([node.proc.pid for node in self._nodes])
        measuring, counted = False, 0
        while (now := time.monotonic()) < window.end:
            if not measuring and now >= window.measure:
                cpu.begin()
                measuring = True
            progress(now - window.measure, counted)
            edge = window.end if measuring else window.measure
            try:
                message = leader.messages.get(timeout=max(0.0, min(0.25, edge - now)))
            except queue.Empty:
                continue
            if message is None:
                raise CliError(f"raw: leader {leader.address} exited during the run", ERROR)
            counted = message.get("progress", counted)
        if not measuring:
            cpu.begin()
        cpu.end()
        while True:
            message = leader.messages.get(timeout=spec.op_timeout + 30)
            if message is None:
                raise CliError(f"raw: leader {leader.address} exited during the run", ERROR)
            if "result" in message:
                break
        answer = message["result"]
        client_cpu = float(answer["client_cpu"])
        result = RunResult(latencies=answer["latencies"], reads=answer["reads"],
                           writes=answer["writes"], error_samples=answer["samples"],
                           client_cpu=client_cpu, busy_cpu=cpu.busy_cpu,
                           node_cpu=None if cpu.node_cpu is None else cpu.node_cpu - client_cpu)
        result.errors.update(answer["errors"])
        if answer["stuck"]:
            result.errors["ClientStuck"] += answer["stuck"]
        progress(spec.duration, len(result.latencies))
        return result

    def stop(self) -> None:
        try:
            for node in self._nodes:
                try:
                    node.send({"cmd": "stop"})
                    assert node.proc.stdin is not None
                    node.proc.stdin.close()
                except (CliError, OSError):
                    pass
            deadline = time.monotonic() + 5
            for node in self._nodes:
                try:
                    node.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(5)
                if node.proc.stdout is not None:
                    node.proc.stdout.close()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def markers(self) -> list[str]:
        return [str(self._tmp)] if self._tmp else []

    def describe(self) -> dict[str, object]:
        p = SHIPPED
        return {
            "system": "plain PySyncObj 0.3.17: a SyncObj subclass with @replicated set/get",
            "nodes": self.nodes,
            "cluster": "fresh, one process per node, journal + dump files, password",
            "client": "threads inside the leader process doing sync=True calls (PySyncObj has "
                      "no client API); they share the leader's GIL; their CPU is client CPU",
            "timers": f"profile {p.name!r} mapped as ours, but autoTick (PySyncObj's own tick "
                      f"thread, period {p.tick_period}s): a plain SyncObj cannot use our driven "
                      f"loop, so appends wait for appendEntriesPeriod {p.append_entries_period}s "
                      f"(batching {'on' if p.append_entries_use_batch else 'off'})",
            "fsync": "off: PySyncObj never fsyncs (D3)",
            "node_cpu": "measured, without the client threads",
            "dir": str(self._tmp) if self._tmp else None,
        }


if __name__ == "__main__":
    node_main()
