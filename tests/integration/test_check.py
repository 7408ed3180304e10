"""``kv check`` end to end: the shipped settings pass under every fault, and a planted bug fails.

Each run is short and seeded (the seed is printed, so a failure can be rerun with
``kv check --seed N``); the long soak is ``kv check --duration 10m`` (README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("KV_CHECK_SEED", "20261127"))
RUN_DEADLINE = 240.0


def kv_check(report: Path, *args: str, timeout: float = RUN_DEADLINE,
             seed: int = SEED) -> tuple[int, dict[str, object], str]:
    """Runs ``kv check -w json`` and returns (exit code, verdict summary, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "check", "-w", "json", "--seed", str(seed),
         "--report", str(report), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # kv check stops its nodes and unmounts its file systems on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"kv check {' '.join(args)} ran over {timeout:.0f} s") from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    print(f"kv check --seed {seed} {' '.join(args)} -> exit {done.returncode}")
    print(done.stdout)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout.splitlines()[0]), done.stderr


def test_every_workload_passes_under_kill_pause_and_partition(tmp_path: Path) -> None:
    code, summary, _ = kv_check(tmp_path / "report", "--workload", "all", "--faults",
                                "kill,pause,partition", "--duration", "40s")
    assert summary["verdict"] == "valid", summary
    assert code == 0
    assert summary["ops_ok"] > 1000
    assert sum(summary["faults_injected"].values()) >= 5, "too few faults to mean anything"  # type: ignore[union-attr]
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
    assert (tmp_path / "report" / "history.jsonl").stat().st_size > 0


def test_a_state_machine_without_dedup_fails_the_list_append_and_counter_checks(tmp_path: Path) -> None:
    """The checkers catch what they claim to: with deduplication planted off, a retried
    proposal is applied twice, which list-append sees as a duplicate and counter as an overcount."""
    code, summary, _ = kv_check(tmp_path / "report", "--workload", "list-append,counter",
                                "--faults", "kill,partition", "--duration", "25s",
                                "--planted-bug", "no-dedup")
    assert code == 1
    assert summary["verdict"] == "INVALID"
    violations = summary["violations"]
    assert violations["list-append"] > 0 and violations["counter"] > 0, violations  # type: ignore[index]
