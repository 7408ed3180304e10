"""etcd as a benchmark target: ``--nodes`` members on 127.0.0.1, loaded through the HTTP gateway.

The members run from Debian's ``etcd-server`` package (``etcd`` on the PATH), each with its own
data directory in one temporary directory, in their own process session (a Ctrl-C at the
terminal reaches ``kv bench`` only, which then stops them) and with a parent-death signal
(``with_parent_death``), so they die with ``kv bench`` even if it is SIGKILLed. ``stop`` always
runs: SIGTERM to one member at a time, SIGKILL after a grace period, then the directory is
removed.

Clients talk to the leader, as our clients do (ours answer a follower's refusal with a leader
hint; etcd would forward from a follower, a second hop).
"""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cli.bench.common import Progress, RunResult, RunSpec, with_parent_death
from cli.bench.guard import Guard
from cli.bench.load import WorkerPool
from cli.exits import ERROR, UNAVAILABLE, CliError
from cli.ports import HOST, free_ports
from cli.processes import APART

START_TIMEOUT = 30.0
STOP_GRACE = 5.0
INSTALL_HINT = "etcd is not installed: the 'etcd' binary was not found on PATH " \
               "(Debian/Ubuntu: apt-get install etcd-server)"


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise CliError(INSTALL_HINT, ERROR)
    return path


def etcd_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _request(endpoint: str, method: str, path: str, body: Any = None,
             timeout: float = 2.0) -> Any:
    host, _, port = endpoint.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


class EtcdTarget:
    name = "etcd"

    def __init__(self, pool: WorkerPool, *, members: int) -> None:
        self.pool = pool
        self.members = members
        self.binary = etcd_binary()
        self.version = etcd_version(self.binary)
        self._tmp: Path | None = None
        self.guard: Guard | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.client_urls: list[str] = []
        self.leader: str | None = None

    def start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="kv-bench-etcd-"))
        if self.guard is not None:
            self.guard.register("dir", self._tmp)
        ports = free_ports(2 * self.members)
        names = [f"e{i + 1}" for i in range(self.members)]
        clients = [f"{HOST}:{ports[2 * i]}" for i in range(self.members)]
        peers = [f"http://{HOST}:{ports[2 * i + 1]}" for i in range(self.members)]
        initial = ",".join(f"{n}={p}" for n, p in zip(names, peers, strict=True))
        token = f"kv-bench-{secrets.token_hex(4)}"
        for name, client, peer in zip(names, clients, peers, strict=True):
            argv = [
                self.binary, "--name", name, "--data-dir", str(self._tmp / name),
                "--listen-client-urls", f"http://{client}",
                "--advertise-client-urls", f"http://{client}",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-token", token,
                "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            ]
            with open(self._tmp / f"{name}.log", "wb") as log:
                self._procs.append(subprocess.Popen(
                    with_parent_death(argv), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, **APART))
        self.client_urls = clients
        self._wait_healthy(time.monotonic() + START_TIMEOUT)

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            for i, proc in enumerate(self._procs):
                if proc.poll() is not None:
                    raise CliError(f"etcd: member e{i + 1} exited with code {proc.returncode} "
                                   f"while starting: {self._log_tail(i)}", UNAVAILABLE)
            try:
                if all(_request(c, "GET", "/health").get("health") == "true"
                       for c in self.client_urls):
                    self._find_leader()
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise CliError(f"etcd: not healthy within {START_TIMEOUT:.0f}s: "
                               f"{self._log_tail(0)}", UNAVAILABLE)
            time.sleep(0.1)

    def _log_tail(self, i: int) -> str:
        assert self._tmp is not None
        try:
            lines = (self._tmp / f"e{i + 1}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1][:300] if lines else "(empty log)"

    def _find_leader(self) -> str:
        """The client URL of the member that is the leader (``/v3/maintenance/status``)."""
        for client in self.client_urls:
            status = _request(client, "POST", "/v3/maintenance/status", {})
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                self.leader = client
                return client
        raise OSError("no leader yet")

    def current_leader(self) -> str:
        """The leader's client address, looked up again (a leader change between runs is
        possible); raises if a member exited or there is no leader within 10 s."""
        for i, proc in enumerate(self._procs):
            if proc.poll() is not None:
                raise CliError(f"etcd: member e{i + 1} exited: {self._log_tail(i)}", ERROR)
        deadline = time.monotonic() + 10
        while True:
            try:
                return self._find_leader()
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise CliError("etcd: no leader", UNAVAILABLE) from None
                time.sleep(0.1)

    def run(self, spec: RunSpec, progress: Progress) -> RunResult:
        leader = self.current_leader()
        params = {"endpoint": leader, "consistency": spec.consistency,
                  "op_timeout": spec.op_timeout}
        return self.pool.run("etcd", params, spec, [p.pid for p in self._procs], progress)

    def stop(self) -> None:
        # One member at a time: SIGTERM to all at once makes each wait ~7 s on peers that are
        # going away (a leader transfer to a dying member); one by one they exit in ~0.1 s.
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def markers(self) -> list[str]:
        return [str(self._tmp)] if self._tmp else []

    def describe(self) -> dict[str, object]:
        return {
            "system": f"etcd {self.version} ({self.binary})",
            "nodes": self.members,
            "cluster": "fresh, one data dir per member in a temporary directory",
            "endpoints": self.client_urls,
            "client": "HTTP JSON gateway (POST /v3/kv/put, /v3/kv/range, base64 keys), one "
                      "keep-alive http.client connection per client, all to the leader",
            "fsync": "on: etcd fsyncs its WAL on every commit (always)",
            "node_cpu": "measured",
            "dir": str(self._tmp) if self._tmp else None,
        }

