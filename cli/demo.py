"""``kv demo``: exactly-once, shown on a real three-node cluster in under a minute.

Every step is real: node processes on 127.0.0.1, a real SIGKILL of the leader, a restart from
disk. The numbers printed are counted, not scripted; if a run happens to produce no duplicate
without sessions, the summary says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from cli import processes
from cli.cluster_dir import ClusterDir
from cli.kv_click import KvCommand
from kvstore import errors, ops
from kvstore.client import Client
from session import Session

WRITERS = 4
"""Concurrent writers in the crash steps, each with its own session."""
WRITES_PER_WRITER = 60
ATTEMPT_TIMEOUT = 0.01
"""Short on purpose: many attempts time out while their entry still commits, which is exactly
the case where a retry without a session applies twice."""
STEP_DEADLINE = 20.0
"""No crash step runs longer than this, whatever happens."""


def say(text: str = "", *, bold: bool = False, dim: bool = False) -> None:
    click.echo(click.style(text, bold=bold, dim=dim))


def step(number: int, title: str) -> None:
    say()
    say(f"[{number}] {title}", bold=True)


@dataclass
class StreamReport:
    acknowledged: int = 0
    retries: int = 0
    final: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.final - self.acknowledged


class LocalCluster:
    """A throwaway cluster driven through the real ``kv cluster`` commands."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
        self.env = {**env, "KV_CLUSTER_DIR": str(directory)}

    def kv(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cli", *args], env=self.env, text=True,
                              capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise click.ClickException(f"kv {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def up(self) -> None:
        self.kv("cluster", "up", "--detach", "--nodes", "3")

    def down(self) -> None:
        """Stops the cluster; whatever did not stop is SIGKILLed: the demo leaves nothing running."""
        try:
            self.kv("cluster", "down")
        finally:
            cluster_dir = ClusterDir(self.dir)
            for running in processes.running_nodes(cluster_dir, cluster_dir.load()):
                os.kill(running.pid, signal.SIGKILL)

    def endpoints(self) -> list[str]:
        return ClusterDir(self.dir).load().endpoints

    def client(self) -> Client:
        """A client with the cluster's readwrite certificate (``kv cluster up`` makes TLS)."""
        cluster_dir = ClusterDir(self.dir)
        tls = cluster_dir.certs.client_tls() if cluster_dir.load().tls else None
        return Client(self.endpoints(), timeout=10, tls=tls)


def leader(client: Client) -> tuple[str, int]:
    """(API endpoint, OS pid) of the current leader."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for endpoint in client.endpoints:
            try:
                status = client.status(endpoint)
            except errors.Unavailable:
                continue
            if status.role == "leader":
                return endpoint, status.pid
        time.sleep(0.05)
    raise click.ClickException("no leader within 10 s")


def crash_stream(client: Client, key: bytes, *, sessions: bool) -> StreamReport:
    """WRITERS threads increment ``key``; the leader is SIGKILLed once they are under way.

    With sessions, an unknown outcome is retried with the same session (series id). Without,
    a writer does what a plain client does: it retries the same increment, and hopes.
    """
    report = StreamReport()
    lock = threading.Lock()
    deadline = time.monotonic() + STEP_DEADLINE

    def writer() -> None:
        session: Session = client.sync_get_session() if sessions else client.get_noop_session()
        done = 0
        while done < WRITES_PER_WRITER and time.monotonic() < deadline:
            try:
                client.sync_propose(session, ops.incr(key), timeout=ATTEMPT_TIMEOUT)
            except (errors.OutcomeUnknown, errors.Unavailable):
                with lock:
                    report.retries += 1
                continue  # the same session and series id again (or, without one, just again)
            except errors.KVError as exc:
                with lock:
                    report.problems.append(str(exc))
                return
            if sessions:
                session.proposal_completed()
            done += 1
            with lock:
                report.acknowledged += 1

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(WRITERS)]
    for thread in threads:
        thread.start()
    while report.acknowledged < WRITERS * WRITES_PER_WRITER // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    endpoint, pid = leader(client)
    os.kill(pid, signal.SIGKILL)
    say(f"    SIGKILL leader {endpoint} (pid {pid}) after {report.acknowledged} acknowledged increments")
    for thread in threads:
        thread.join(STEP_DEADLINE + 5)
    report.final = int(client.get(key, timeout=10).value or b"0")
    return report


def run_demo(keep: bool) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kv-demo-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster")
        say("exactly-once client sessions on Raft: a narrated tour", bold=True)
        say(f"Starting 3 nodes on 127.0.0.1 in {cluster.dir} ...", dim=True)
        cluster.up()
        try:
            with cluster.client() as client:
                endpoint, pid = leader(client)
                say(f"    cluster {client.cluster_id} is up; leader {endpoint} (pid {pid})")
                summary = tour(client, cluster)
        finally:
            cluster.down()
        elapsed = time.monotonic() - started
        print_summary(summary, elapsed)
        if keep:
            say(f"(the cluster's data was in {cluster.dir}; it is removed with the demo)", dim=True)


def tour(client: Client, cluster: LocalCluster) -> tuple[StreamReport, StreamReport]:
    step(1, "A proposal with a session")
    session = client.sync_get_session()
    say(f"    session opened: client id {session.client_id}, first series id {session.series_id}")
    first = client.sync_propose(session, ops.incr(b"demo/counter"))
    say(f"    incr demo/counter  ->  {first.number}   (series id {session.series_id})")

    step(2, "The answer is lost; the client retries with the SAME series id")
    again = client.sync_propose(session, ops.incr(b"demo/counter"))
    value = int(client.get(b"demo/counter").value)
    say(f"    retry incr demo/counter  ->  {again.number}   (answered from the session cache)")
    say(f"    demo/counter is {value}: the increment was applied once")
    session.proposal_completed()
    say(f"    proposal_completed(): next series id {session.series_id}, "
        f"responded_to {session.responded_to}")

    step(3, f"SIGKILL the leader while {WRITERS} writers increment, with sessions")
    with_sessions = crash_stream(client, b"demo/with-sessions", sessions=True)
    say(f"    acknowledged {with_sessions.acknowledged}, retries {with_sessions.retries}, "
        f"final counter {with_sessions.final}")
    cluster.up()
    say("    `kv cluster up` restarted the killed node from its data on disk", dim=True)

    step(4, "The same crash without sessions (no-op sessions, plain retries)")
    without = crash_stream(client, b"demo/without-sessions", sessions=False)
    say(f"    acknowledged {without.acknowledged}, retries {without.retries}, "
        f"final counter {without.final}")
    cluster.up()
    client.sync_close_session(session)
    return with_sessions, without


def duplicates_line(count: int) -> str:
    """``"1 retry was applied a second time"``, ``"3 retries were ..."``."""
    if count == 1:
        return "1 retry was applied a second time"
    return f"{count} retries were applied a second time"


def print_summary(reports: tuple[StreamReport, StreamReport], elapsed: float) -> None:
    with_sessions, without = reports
    say()
    say("Summary", bold=True)
    say(f"    {'':28} {'acknowledged':>12} {'counter':>8} {'applied twice':>14} {'retries':>8}")
    for name, report in (("with sessions", with_sessions), ("without sessions", without)):
        say(f"    {name:28} {report.acknowledged:>12} {report.final:>8} "
            f"{report.duplicates:>14} {report.retries:>8}")
    say()
    if with_sessions.duplicates == 0:
        say("    With sessions every retried increment was applied exactly once, through a leader crash.")
    else:
        say(f"    UNEXPECTED: {with_sessions.duplicates} duplicate(s) with sessions. "
            "Please report this.",
            bold=True)
    if without.duplicates > 0:
        say(f"    Without sessions {duplicates_line(without.duplicates)}: the counter overcounts.")
    else:
        say("    Without sessions no retry happened to commit twice this run; run it again, the "
            "risk is real.")
    for problem in with_sessions.problems + without.problems:
        say(f"    note: a writer stopped early: {problem}", dim=True)
    say(f"    ({elapsed:.0f} s; the cluster is stopped and its directory removed)", dim=True)


@click.command(cls=KvCommand)
@click.option("--keep-log", "keep", is_flag=True, hidden=True)
def demo(keep: bool) -> None:
    """A narrated demo of exactly-once on a temporary 3-node cluster (under a minute)."""
    run_demo(keep)
