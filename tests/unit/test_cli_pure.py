"""The parts of the ``kv`` CLI that need no cluster: files, formats, processes, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent import futures
from collections.abc import Iterator
from pathlib import Path

import click
import grpc
import pytest

from cli import exits, main, output, processes, session_file
from cli.cluster_dir import ClusterDir
from cli.exits import CliError
from cli.node_cmd import check_exposure
from cli.settings import Settings, global_options
from kvstore.config import ConfigError
from session import Session
from tests.support import flock_waiters, wait_for

# -- output ----------------------------------------------------------------------------------------


def test_json_bytes_is_text_when_utf8_and_says_base64_otherwise() -> None:
    assert output.json_bytes("key", "clé".encode()) == {"key": "clé"}
    assert output.json_bytes("value", b"\xff\x00") == {"value_b64": "/wA="}


def test_text_never_fails_on_binary() -> None:
    assert output.text(b"a\xffb") == "a\\xffb"


def test_table_has_etcdctl_shape() -> None:
    assert output.table(["id", "role"], [["n1", "leader"], ["n22", "follower"]]).splitlines() == [
        "+-----+----------+",
        "| ID  |   ROLE   |",
        "+-----+----------+",
        "| n1  | leader   |",
        "| n22 | follower |",
        "+-----+----------+",
    ]


def test_emit_formats(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    report = output.Report({"kvs": [{"key": "é"}]}, ["key", "value"], [["é", "x"]], [b"\xe9", b"x"])
    output.emit(report, "json")
    assert json.loads(capsysbinary.readouterr().out) == {"kvs": [{"key": "é"}]}
    output.emit(report, "simple")
    assert capsysbinary.readouterr().out == b"\xe9\nx\n"  # bytes as they are
    output.emit(output.Report({}, ["a", "b"], [["1", "2"]]), "simple")
    assert capsysbinary.readouterr().out == b"1, 2\n"  # default: etcdctl's comma rows


# -- session files ---------------------------------------------------------------------------------


def _session(series_id: int = 1, responded_to: int = 0) -> Session:
    return Session(cluster_id=7, client_id=2**64 - 5, series_id=series_id,
                   responded_to=responded_to)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_session_file_round_trip_is_private_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    session_file.create(path, _session())
    assert _mode(path) == 0o600
    assert session_file.read(path) == _session()
    session_file.write(path, _session(2, 1))
    assert session_file.read(path) == _session(2, 1)
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no temporary left behind
    assert json.loads(path.read_text()) == {
        "cluster_id": 7, "client_id": 2**64 - 5, "series_id": 2, "responded_to": 1}


def test_session_file_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    session_file.create(path, _session())
    with pytest.raises(CliError, match="already exists"):
        session_file.create(path, _session(5, 4))
    assert session_file.read(path) == _session()


@pytest.mark.parametrize("content", [
    b"not json",
    b"\xff",
    b"[]",
    b'{"cluster_id": 1, "client_id": 2, "series_id": 3}',
    b'{"cluster_id": 1, "client_id": 2, "series_id": 3, "responded_to": 0, "x": 1}',
    b'{"cluster_id": true, "client_id": 2, "series_id": 3, "responded_to": 0}',
    b'{"cluster_id": -1, "client_id": 2, "series_id": 3, "responded_to": 0}',
    b'{"cluster_id": 1, "client_id": 2, "series_id": "3", "responded_to": 0}',
])
def test_a_bad_session_file_is_invalid_input(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(session_file.SessionFileError) as caught:
        session_file.read(path)
    assert caught.value.exit_code == exits.INVALID_INPUT


def test_a_missing_session_file_says_how_to_open_one(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="kv session open"):
        session_file.read(tmp_path / "nope.json")
    with pytest.raises(CliError, match="kv session open"), \
            session_file.locked(tmp_path / "nope.json"):
        pass


def test_a_waiting_command_sees_the_session_its_predecessor_wrote(tmp_path: Path) -> None:
    """The second command must read series 2, not the stale inode it opened while waiting."""
    path = tmp_path / "s.json"
    session_file.create(path, _session())
    first_has_lock, seen = threading.Event(), []

    def second() -> None:
        first_has_lock.wait()
        with session_file.locked(path) as s:
            seen.append(s)

    with session_file.locked(path) as s:
        first_has_lock.set()
        waiter = threading.Thread(target=second)
        waiter.start()
        wait_for(lambda: flock_waiters(path), 5, "the second command to block on the lock")
        assert not seen
        s.proposal_completed()
        session_file.write(path, s)
    waiter.join(5)
    assert seen == [_session(2, 1)]


# -- the cluster directory -------------------------------------------------------------------------


def test_a_new_cluster_dir(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path / "c")
    spec = cluster.create(3)
    assert cluster.load() == spec
    assert spec.cluster_id % 2 == 1 and 0 < spec.cluster_id < 2**63
    assert [n.id for n in spec.nodes] == ["n1", "n2", "n3"]
    addresses = [a for n in spec.nodes for a in (n.raft, n.api)]
    assert len(set(addresses)) == 6 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert spec.endpoints == [n.api for n in spec.nodes]
    assert [n.data_dir for n in spec.nodes] == ["n1/data", "n2/data", "n3/data"]  # relative
    assert (spec.session_capacity, spec.snapshot_count) == (4096, 5000)
    small = ClusterDir(tmp_path / "small").create(1, session_capacity=8, snapshot_count=50)
    assert ClusterDir(tmp_path / "small").load() == small
    assert _mode(cluster.secret_file) == 0o600
    assert len(cluster.secret_file.read_text().strip()) == 64
    assert _mode(cluster.path) == 0o700


def test_two_clusters_get_different_ids_and_secrets(tmp_path: Path) -> None:
    a, b = ClusterDir(tmp_path / "a"), ClusterDir(tmp_path / "b")
    assert a.create(1).cluster_id != b.create(1).cluster_id
    assert a.secret_file.read_bytes() != b.secret_file.read_bytes()


def test_a_dir_without_a_cluster(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="kv cluster up") as caught:
        ClusterDir(tmp_path).load()
    assert caught.value.exit_code == exits.INVALID_INPUT
    (tmp_path / "cluster.json").write_text(
        '{"version": 1, "cluster_id": 5, "session_capacity": 8, "snapshot_count": 9}')
    with pytest.raises(CliError, match="no 'nodes'"):
        ClusterDir(tmp_path).load()


# -- node processes --------------------------------------------------------------------------------


def test_node_argv_names_peers_and_keeps_the_secret_off_the_command_line(tmp_path: Path) -> None:
    cluster = ClusterDir(tmp_path)
    spec = cluster.create(3)
    argv = processes.node_argv(cluster, spec, spec.nodes[0])
    assert argv[:5] == [sys.executable, "-m", "cli", "node", "run"]
    peers = [argv[i + 1] for i, a in enumerate(argv) if a == "--peer"]
    assert peers == [f"{n.id}={n.raft}={n.api}" for n in spec.nodes[1:]]
    secret = cluster.secret_file.read_text().strip()
    assert not any(secret in a for a in argv)
    assert processes.is_node_process(os.getpid(), "n1", cluster.data_dir(spec.nodes[0])) is False


class FakeNodes:
    """Processes whose command line looks like node n1's; ``stubborn`` ones ignore SIGTERM."""

    CODE = ("import signal, sys, time\n"
            "if 'stubborn' in sys.argv: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)")

    def __init__(self, path: Path) -> None:
        self.cluster = ClusterDir(path)
        spec = self.cluster.create(1)
        self.cluster.prepare_node_dirs(spec)
        self.node = spec.nodes[0]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str) -> processes.RunningNode:
        proc = subprocess.Popen(
            [sys.executable, "-c", self.CODE, "node", "run", "--id", self.node.id,
             "--data-dir", str(self.cluster.data_dir(self.node)), *extra], stdout=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        self.cluster.write_pid(self.node.id, proc.pid)
        return processes.RunningNode(self.node, proc.pid)


@pytest.fixture
def fake_nodes(tmp_path: Path) -> Iterator[FakeNodes]:
    fakes = FakeNodes(tmp_path)
    yield fakes
    for proc in fakes.procs:
        proc.kill()
        proc.wait()


def test_a_node_is_running_only_if_its_pid_runs_its_command_line(fake_nodes: FakeNodes) -> None:
    cluster, node = fake_nodes.cluster, fake_nodes.node
    running = fake_nodes.start()
    assert processes.running_pid(cluster, node) == running.pid
    cluster.write_pid(node.id, os.getpid())  # a pid reused by an unrelated process
    assert processes.running_pid(cluster, node) is None
    cluster.write_pid(node.id, running.pid)
    os.kill(running.pid, signal.SIGKILL)
    assert processes.wait_until_gone(cluster, [running], 5) == []  # a zombie counts as gone
    assert processes.running_pid(cluster, node) is None


@pytest.mark.skipif(shutil.which("ps") is None, reason="no ps")
def test_without_proc_the_command_line_comes_from_ps(fake_nodes: FakeNodes) -> None:
    running = fake_nodes.start()
    assert processes._command_line_from_ps(running.pid)[-4:] == [
        "--id", "n1", "--data-dir", str(fake_nodes.cluster.data_dir(fake_nodes.node))]
    os.kill(running.pid, signal.SIGKILL)
    processes.wait_until_gone(fake_nodes.cluster, [running], 5)
    assert processes._command_line_from_ps(running.pid) == []  # a zombie, or gone


def test_stop_terms_then_kills(fake_nodes: FakeNodes) -> None:
    polite = fake_nodes.start()
    assert processes.stop(fake_nodes.cluster, [polite], grace=5) == {"n1": "stopped"}
    stubborn = fake_nodes.start("stubborn")
    assert processes.stop(fake_nodes.cluster, [stubborn], grace=0.3) == {"n1": "killed"}


def test_a_failed_start_shows_only_the_last_start_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_text(f"{processes.START_MARKER} n1\nold run\n{processes.START_MARKER} n1\n"
                   + "".join(f"line {i}\n" for i in range(100)))
    assert processes.last_start_log(log, 3) == ["line 97", "line 98", "line 99"]
    log.write_text(f"{processes.START_MARKER} n1\nold run\n{processes.START_MARKER} n1\nnew run\n")
    assert processes.last_start_log(log) == ["new run"]
    assert processes.last_start_log(tmp_path / "none") == []


# -- node run refuses to run without a secret ------------------------------------------------------


def test_no_secret_no_node() -> None:
    with pytest.raises(ConfigError, match="secret is required"):
        check_exposure("", ["127.0.0.1:1", "127.0.0.1:2"])
    with pytest.raises(ConfigError, match="must never be exposed"):
        check_exposure("", ["127.0.0.1:1", "10.1.2.3:2"])
    check_exposure("s3cret", ["10.1.2.3:2"])


def test_node_run_without_secret_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KV_SECRET", raising=False)
    code = main.run(["node", "run", "--id", "n1", "--cluster-id", "1", "--raft", "127.0.0.1:1",
                     "--api", "127.0.0.1:2", "--data-dir", str(tmp_path)])
    assert code == exits.INVALID_INPUT
    err = capsys.readouterr().err
    assert err.startswith("Error: a cluster secret is required") and err.count("\n") == 1


# -- options and exit codes ------------------------------------------------------------------------


@pytest.fixture
def probe_settings() -> Iterator[list[Settings]]:
    """A throwaway subcommand that records the settings it was run with."""
    seen: list[Settings] = []

    @click.command("probe-settings")
    @global_options
    def probe() -> None:
        seen.append(Settings.current())

    main.kv.add_command(probe)
    yield seen
    del main.kv.commands["probe-settings"]


def test_option_precedence(probe_settings: list[Settings], monkeypatch: pytest.MonkeyPatch,
                           tmp_path: Path) -> None:
    monkeypatch.setenv("KV_WRITE_OUT", "table")
    monkeypatch.setenv("KV_ENDPOINTS", "127.0.0.1:9,127.0.0.1:10")
    monkeypatch.setenv("KV_COMMAND_TIMEOUT", "7.5")
    assert main.run(["-w", "json", "probe-settings"]) == 0
    assert main.run(["-w", "json", "probe-settings",
                     "-w", "simple", "--endpoints", "127.0.0.1:1"]) == 0
    assert main.run(["probe-settings"]) == 0
    first, second, third = probe_settings
    assert (first.write_out, first.endpoints, first.timeout) == (
        "json", ["127.0.0.1:9", "127.0.0.1:10"], 7.5)
    assert (second.write_out, second.endpoints) == ("simple", ["127.0.0.1:1"])
    assert third.write_out == "table"  # the env var alone


def test_endpoints_default_to_the_cluster_dir(
        probe_settings: list[Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KV_ENDPOINTS", raising=False)
    monkeypatch.setenv("KV_CLUSTER_DIR", str(tmp_path))
    spec = ClusterDir(tmp_path).create(2)
    assert main.run(["probe-settings"]) == 0
    assert probe_settings[0].target() == (spec.endpoints, spec.cluster_id)


@pytest.mark.parametrize("args, code, message", [
    (["put", "k"], exits.BAD_ARGUMENTS, "Missing argument 'VALUE'"),
    (["get", "k", "--limit", "3"], exits.BAD_ARGUMENTS, "--limit needs --prefix"),
    (["cas", "k", "v"], exits.BAD_ARGUMENTS, "exactly one of --expect"),
    (["incr", "k", "x"], exits.BAD_ARGUMENTS, "'x' is not an integer"),
    (["-w", "yaml", "get", "k"], exits.BAD_ARGUMENTS, "'yaml' is not one of"),
    (["nope"], exits.BAD_ARGUMENTS, "No such command"),
    (["get", "k", "--endpoints", "nohostport"], exits.BAD_ARGUMENTS,
     "'nohostport' is not HOST:PORT"),
    (["session", "show", "--session", "/nonexistent/s.json"], exits.ERROR, "no session file"),
    (["session", "open", "--session", "/nonexistent/s.json"], exits.ERROR, "not a directory"),
])
def test_errors_are_one_line_with_their_exit_code(args: list[str], code: int, message: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_WRITE_OUT", raising=False)
    assert main.run(args) == code
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and err.count("\n") == 1


AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'kv'; runpy.run_module('cli', run_name='__main__')")
"""``python -m cli`` with Ctrl-C raising KeyboardInterrupt, as from a terminal: a test runner
started in the background (or mutmut's workers) ignores SIGINT, and a child inherits that. Set in
the child itself, not by ``preexec_fn``: a ``preexec_fn`` makes ``subprocess`` fork (not vfork)
this process, with the test's gRPC server running, and run the fork handlers in the child. Once,
under load, the command died that way (exit -6, gRPC's "epoll ... Bad file descriptor")."""


def test_ctrl_c_exits_5_with_one_line(tmp_path: Path) -> None:
    """A real ``kv`` process, interrupted while it waits for an answer, exits 5 with one line.
    The "node" is a gRPC server whose every method waits and never answers: once a request has
    arrived there, the command is inside its call, where a user would press Ctrl-C."""
    arrived, release = threading.Event(), threading.Event()

    def never_answers(request: bytes, context: grpc.ServicerContext) -> bytes:
        arrived.set()
        release.wait(30)
        return b""

    class AnyMethod(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(never_answers)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[AnyMethod()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    try:
        command = subprocess.Popen(
            [sys.executable, "-c", AS_FROM_A_TERMINAL, "--endpoints", f"127.0.0.1:{port}",
             "--timeout", "60", "get", "k"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 30
            while not arrived.wait(0.1) and command.poll() is None and time.monotonic() < deadline:
                pass
            if not arrived.is_set():  # say why, so that a failure here can be diagnosed
                command.kill()
                out, err = command.communicate(timeout=30)
                pytest.fail(f"the command's request never reached the server: exit "
                            f"{command.returncode}, stdout {out!r}, stderr {err!r}")
            command.send_signal(signal.SIGINT)
            out, err = command.communicate(timeout=30)
        finally:
            command.kill()
    finally:
        release.set()
        server.stop(None)
    assert (command.returncode, out, err) == (exits.INTERRUPTED, b"", b"Error: interrupted\n")
    assert exits.INTERRUPTED == 5


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.run(["--help"]) == 0
    assert "Exit codes" in capsys.readouterr().out


def test_a_bug_is_one_line_unless_debugging(probe_settings: list[Settings],
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KV_DEBUG", raising=False)
    monkeypatch.setattr(Settings, "current", staticmethod(lambda: 1 / 0))
    assert main.run(["probe-settings"]) == exits.ERROR
    err = capsys.readouterr().err
    assert err.startswith("Error: internal error: ZeroDivisionError") and err.count("\n") == 1
    with pytest.raises(ZeroDivisionError):
        main.run(["probe-settings", "--debug"])
