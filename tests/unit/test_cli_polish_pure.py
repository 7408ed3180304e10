"""The rough edges a new user hit (issue 13), each pinned by the exact line they now get.

Everything here runs without a cluster: commands that fail before contacting one, the pure
parts (durations, the status columns, the bench report), and the write path's decision about
an unknown outcome with a stand-in client.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from cli import data_cmd, demo, exits, main, node_status, version_cmd
from cli.bench.runner import REPORT_WIDTH, text_report
from cli.cluster_dir import ClusterDir
from cli.params import parse_duration
from cli.settings import Settings, global_options
from kvstore.errors import OutcomeUnknown
from kvstore.proto.log_pb2 import Result
from session import SERIES_ID_FOR_REGISTER, SERIES_ID_FOR_UNREGISTER

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_kv_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KV_WRITE_OUT", "KV_ENDPOINTS", "KV_COMMAND_TIMEOUT", "KV_DIAL_TIMEOUT",
                 "KV_CLUSTER_DIR", "KV_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main.run(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


# -- 1. a group without a subcommand prints its help ---------------------------------------------


@pytest.mark.parametrize("group", [[], ["cluster"], ["session"], ["node"]])
def test_a_group_without_a_subcommand_prints_its_help_and_exits_0(
        group: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(group, capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"Usage: {' '.join(['kv', *group])} [OPTIONS] COMMAND [ARGS]...\n")
    assert "\nCommands:\n" in out


# -- 6. durations everywhere, integers in words ---------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("5", 5.0), ("2.5", 2.5), ("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0),
    ("1m30s", 90.0), ("1.5s", 1.5), (" 2s ", 2.0),
])
def test_durations_parse_as_etcdctl_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "s", "5 s", "-1s", "1s5", "ms"])
def test_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.fixture
def seen_settings() -> Iterator[list[Settings]]:
    """A throwaway subcommand that records the settings it was run with."""
    seen: list[Settings] = []

    @click.command("seen-settings")
    @global_options
    def probe() -> None:
        seen.append(Settings.current())

    main.kv.add_command(probe)
    yield seen
    del main.kv.commands["seen-settings"]


def test_timeouts_take_durations_on_the_command_line_and_in_the_environment(
        seen_settings: list[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main.run(["seen-settings", "--timeout", "5s", "--dial-timeout", "500ms"]) == 0
    monkeypatch.setenv("KV_COMMAND_TIMEOUT", "1m")
    assert main.run(["--dial-timeout", "2s", "seen-settings"]) == 0
    first, second = seen_settings
    assert (first.timeout, first.dial_timeout) == (5.0, 0.5)
    assert (second.timeout, second.dial_timeout) == (60.0, 2.0)


@pytest.mark.parametrize("args, line", [
    (["get", "k", "--timeout", "5x"], "Error: Invalid value for '--timeout' / '--command-timeout':"
     " '5x' is not a duration (like 500ms, 5s or 1m) (see 'kv get --help')"),
    (["get", "k", "--dial-timeout", "0s"], "Error: Invalid value for '--dial-timeout': '0s' is "
     "not a positive duration (see 'kv get --help')"),
    (["incr", "x", "abc"], "Error: Invalid value for '[DELTA]': 'abc' is not an integer "
     "(see 'kv incr --help')"),
    (["cluster", "up", "--start-timeout", "soon"], "Error: Invalid value for '--start-timeout': "
     "'soon' is not a duration (like 500ms, 5s or 1m) (see 'kv cluster up --help')"),
    (["check", "--duration", "forever"], "Error: Invalid value for '--duration': 'forever' is not "
     "a duration (like 500ms, 5s or 1m) (see 'kv check --help')"),
    (["get", "k", "--prefix", "--limit", "many"], "Error: Invalid value for '--limit': 'many' is "
     "not an integer (see 'kv get --help')"),
])
def test_bad_durations_and_integers_are_bad_arguments_in_words(
        args: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert (code, out, one_error(err)) == (exits.BAD_ARGUMENTS, "", line)


# -- 8. bad endpoints are bad arguments; session files are refused in the CLI's words -------------


def test_garbage_endpoints_are_bad_arguments(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(["--endpoints", "garbage", "get", "k"], capsys)
    assert (code, one_error(err)) == (exits.BAD_ARGUMENTS, "Error: Invalid value for "
                                      "'--endpoints': 'garbage' is not HOST:PORT (see 'kv --help')")
    monkeypatch.setenv("KV_ENDPOINTS", "127.0.0.1:1,nope")
    code, _, err = run(["get", "k"], capsys)
    assert (code, one_error(err)) == (exits.BAD_ARGUMENTS, "Error: Invalid value for "
                                      "'--endpoints': 'nope' is not HOST:PORT (in KV_ENDPOINTS) "
                                      "(see 'kv --help')")


@pytest.mark.parametrize("series_id, responded_to, reason", [
    (SERIES_ID_FOR_UNREGISTER, 0, "it is prepared for closing (series id 2^64-1), not for writes"),
    (SERIES_ID_FOR_REGISTER, 0, "it is prepared for registering (series id 2^64-2), not for "
     "writes"),
    (0, 0, "series id 0 is a no-op session, which makes no retry safe"),
    (3, 5, "responded_to 5 is past series_id 3"),
])
def test_a_session_file_that_cannot_write_is_refused_in_cli_words(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], series_id: int, responded_to: int,
        reason: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"cluster_id": 7, "client_id": 42, "series_id": series_id,
                                "responded_to": responded_to}))
    before = path.read_bytes()
    code, out, err = run(["put", "k", "v", "--session", str(path), "--endpoints", "127.0.0.1:1"],
                         capsys)
    assert (code, out) == (exits.INVALID_INPUT, "")
    assert one_error(err) == (f"Error: the session in {path} cannot write: {reason}; open a new "
                              f"one with 'kv session open --session {path}'")
    assert "sync_get_session" not in err and path.read_bytes() == before


# -- 5. an unknown outcome without --session -------------------------------------------------------


class StandInClient:
    """The two calls ``_write_once`` makes around the write; the write itself is the test's."""

    def __init__(self, close_works: bool) -> None:
        self.close_works = close_works
        self.opened: list[object] = []
        self.closed: list[object] = []

    def sync_get_session(self, timeout: float | None = None) -> object:
        self.opened.append(object())
        return self.opened[-1]

    def sync_close_session(self, session: object, timeout: float | None = None) -> None:
        if not self.close_works:
            raise OutcomeUnknown("timed out")
        self.closed.append(session)


def timing_out(client: Any, session: Any, timeout: float) -> Result:
    raise OutcomeUnknown("timed out; the request may have been applied; retry with the same "
                         "session")


@pytest.mark.parametrize("close_works, later", [
    (True, "and will not be applied later (its session is closed)"),
    (False, "and may still be applied later"),
])
def test_an_unknown_outcome_without_a_session_says_what_the_user_can_do(
        close_works: bool, later: str) -> None:
    client = StandInClient(close_works)
    with pytest.raises(exits.CliError) as raised:
        data_cmd._write_once(client, "visits", timing_out, Settings())  # type: ignore[arg-type]
    assert raised.value.exit_code == exits.OUTCOME_UNKNOWN
    assert str(raised.value) == (
        f"outcome unknown: the write may or may not have been applied, {later}; check with "
        "'kv get visits', and use --session FILE (kv session open) to make a retry safe")
    assert "retry with the same session" not in str(raised.value)
    assert client.closed == (client.opened if close_works else [])


def test_a_write_whose_session_could_not_be_opened_was_not_applied() -> None:
    class NoRegister(StandInClient):
        def sync_get_session(self, timeout: float | None = None) -> object:
            raise OutcomeUnknown("timed out; the request may have been applied")

    written: list[object] = []

    def write(client: Any, session: Any, timeout: float) -> Result:
        written.append(session)
        return Result()

    with pytest.raises(exits.CliError) as raised:
        data_cmd._write_once(NoRegister(True), "k", write, Settings())  # type: ignore[arg-type]
    assert (raised.value.exit_code, str(raised.value), written) == (
        exits.UNAVAILABLE, "no answer in time while opening a session for the write: nothing was "
        "applied (k is unchanged); retry", [])


def test_a_write_without_a_session_closes_its_session_after_an_answer() -> None:
    client = StandInClient(close_works=True)
    answer = Result(number=3)
    assert data_cmd._write_once(client, "k", lambda c, s, t: answer,  # type: ignore[arg-type]
                                Settings()) is answer
    assert client.closed == client.opened and len(client.opened) == 1


def test_a_read_that_timed_out_is_unavailable_not_of_unknown_outcome() -> None:
    with pytest.raises(exits.CliError) as raised, data_cmd._read_timeout():
        raise OutcomeUnknown("timed out; the request may have been applied; retry with the "
                             "same session")
    assert (raised.value.exit_code, str(raised.value)) == (
        exits.UNAVAILABLE, "no answer in time (no leader, or one that cannot reach a quorum: see "
        "'kv status'); a read changes nothing, so retrying is safe")


# -- 7. -w json on every command -------------------------------------------------------------------


def test_cluster_down_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ClusterDir(tmp_path / "c").create(2)
    code, out, err = run(["cluster", "down", "-w", "json", "--dir", str(tmp_path / "c")], capsys)
    assert code == 0 and err == "n1: was not running\nn2: was not running\n"
    assert json.loads(out) == {"nodes": [{"id": "n1", "outcome": "was not running"},
                                         {"id": "n2", "outcome": "was not running"}]}


# -- 3. one list of status columns -----------------------------------------------------------------


def test_status_rows_share_one_list_of_columns() -> None:
    answered = {"id": "n1", "endpoint": "127.0.0.1:5", "pid": 9, "alive": True,
                "role": "leader", "term": 2, "commit": 10, "applied": 10, "lag": 0,
                "sessions": 1, "keys": 3, "digest": "ab" * 8, "leader": "127.0.0.1:5",
                "has_quorum": True, "alarms": [], "took_ms": 1.0}
    unreachable = {"id": None, "endpoint": "127.0.0.1:6", "error": node_status.UNREACHABLE,
                   "detail": "failed to connect to all addresses; last error: UNKNOWN: ipv4"}
    remote = node_status.report([answered, unreachable], local=False)
    local = node_status.report([answered, unreachable], local=True)
    assert list(remote.header) == ["id", "endpoint", "role", "fsync", "term", "commit",
                                   "applied", "lag", "sessions", "keys", "digest", "snapshot",
                                   "tick_gap_ms", "alarms"]
    assert list(local.header) == ["id", "endpoint", "pid", *remote.header[2:]]
    assert remote.rows[1] == ["", "127.0.0.1:6", "", "", "", "", "", "", "", "", "", "", "",
                              "unreachable"]
    assert "failed to connect" not in repr(remote.rows)  # gRPC's words stay in -w json's detail
    assert "pid" not in remote.data[0] and local.data[0]["pid"] == 9  # type: ignore[index]
    assert remote.data[1]["detail"].startswith("failed to connect")  # type: ignore[index]


def test_a_status_table_is_the_default_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert Settings().output_format(terminal="table") == "table"
    chosen = Settings(write_out="json", chosen={"write_out"})
    assert chosen.output_format(terminal="table") == "json"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert Settings().output_format(terminal="table") == "simple"


# -- 9. examples, .gitignore, the demo's grammar ---------------------------------------------------


def test_every_example_header_gives_a_command_that_works_from_a_fresh_clone() -> None:
    examples = sorted((REPO / "examples").iterdir())
    assert examples
    for example in examples:
        header = example.read_text().split("\n\n")[0] + example.read_text()[:1500]
        commands = re.findall(r"make venv && [^`\n]+", header)
        assert commands, f"{example.name}: no 'make venv && ...' command in its header"
        assert f"examples/{example.name}" in commands[0], commands[0]
    assert "venv: $(STAMP)" in (REPO / "Makefile").read_text()


def test_the_local_cluster_and_report_dirs_are_ignored_by_git() -> None:
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/kv-cluster/" in ignored and "/kv-check-report/" in ignored


def test_the_demo_counts_retries_in_english() -> None:
    assert demo.duplicates_line(1) == "1 retry was applied a second time"
    assert demo.duplicates_line(3) == "3 retries were applied a second time"


# -- 10. help shows the global options; kv bench fits 80 columns -----------------------------------


@pytest.mark.parametrize("command", [["put"], ["get"], ["cluster", "status"], ["session", "open"],
                                     ["bench"], ["check"], ["version"]])
def test_subcommand_help_lists_the_global_options(
        command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    _, _, options = out.partition("\nOptions:\n")
    options, _, globals_ = options.partition("Global options (before or after the command):\n")
    for flag in ("-w, --write-out", "--endpoints HOST:PORT,...", "--timeout", "--dial-timeout"):
        assert flag in globals_ and flag not in options


def test_put_help_says_how_to_pass_a_file_or_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(["put", "--help"], capsys)
    assert 'VALUE "-" reads the value from stdin' in out and "kv put config - < config.json" in out


def test_the_bench_report_fits_80_columns() -> None:
    row = {"ops": 10, "ops_s": 12_345.0, "p50_ms": 1.25, "p90_ms": 22.5, "p99_ms": 333.25,
           "max_ms": 4444.4, "errors": 12, "client_cpu_us_per_op": 1_234.0,
           "node_cpu_us_per_op": 12_345.0, "node_cores": 1.95, "other_cores": 0.25, "rounds": 3}
    long_fact = "a description of what ran that is much longer than one line of any terminal " * 2
    doc = {
        "config": {"workload": "puts", "value_size": 100, "duration": 10.0, "warmup": 2.0,
                   "rounds": 3},
        "machine": {"cpus": 2, "loadavg_start": [1.5, 1.0, 1.0], "loadavg_end": [2.5, 1, 1]},
        "targets": {"ours": {"system": long_fact, "dir": "/tmp/x"}, "etcd": {"system": "etcd"}},
        "results": [{"target": t, "clients": c, **row} for t in ("ours", "etcd")
                    for c in (1, 16, 64)],
        "ratios": [{"vs": "etcd", "clients": c, "ops_s": 0.64, "p50_ms": 1.4, "p99_ms": 3.0,
                    "node_cpu_us_per_op": 1.8, "ops_s_per_round": [0.6, 0.7, 0.65]}
                   for c in (1, 16, 64)],
        "leftover_processes": [],
    }
    lines = "\n".join(text_report(doc)).splitlines()
    assert max(len(line) for line in lines) <= REPORT_WIDTH, max(lines, key=len)
    text = " ".join(lines)
    assert "How to read this:" in text and "Load average 1.50 before, 2.50 after." in text
    assert "noise" not in text


# -- version and the del alias ---------------------------------------------------------------------


def test_version_and_dash_dash_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["version"], capsys)
    assert code == 0 and out.splitlines()[:2] == ["kv version: 0.1.0",
                                                  "pysyncobj version: 0.3.17"]
    assert run(["--version"], capsys)[1] == out
    code, out, _ = run(["version", "-w", "json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["kv"] == "0.1.0" and doc["pysyncobj"] == "0.3.17"
    assert set(doc) == {"kv", *version_cmd.COMPONENTS, "python"}


def test_del_is_delete(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.kv.get_command(click.Context(main.kv), "del") is data_cmd.delete
    code, out, _ = run(["del", "--help"], capsys)
    assert code == 0 and out.startswith("Usage: kv del [OPTIONS] KEY\n") and "--prefix" in out
