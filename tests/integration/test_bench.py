"""``kv bench``: short real runs against a fresh local cluster (and raw PySyncObj), plus the pure
parts (percentiles, medians, the text report, clean refusals) without any process.

The etcd comparison is not run here (CI has no etcd); its missing-binary error is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.bench import stats
from cli.bench.common import RunResult
from cli.bench.runner import text_report
from cli.bench_cmd import bench

RUN_DEADLINE = 120.0
RESULT_FIELDS = {"target", "clients", "rounds", "ops", "ops_s", "p50_ms", "p90_ms", "p99_ms",
                 "max_ms", "errors", "client_cpu_us_per_op", "node_cpu_us_per_op", "node_cores",
                 "other_cores"}


def kv_bench(*args: str) -> dict[str, Any]:
    """Runs ``kv bench -w json ARGS`` and returns its document; fails on a nonzero exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    done = subprocess.run([sys.executable, "-m", "cli", "bench", "-w", "json", *args],
                          capture_output=True, text=True, env=env, timeout=RUN_DEADLINE,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def assert_nothing_left(doc: dict[str, Any]) -> None:
    assert doc["leftover_processes"] == []
    for name, facts in doc["targets"].items():
        directory = facts.get("dir")
        assert directory, name
        assert not os.path.exists(directory), f"{name}: {directory} not removed"
        assert stats.leftovers(directory) == [], f"{name}: processes still running"


@pytest.mark.integration
def test_bench_against_a_fresh_cluster(tmp_path: Path) -> None:
    chart = tmp_path / "bench.svg"
    doc = kv_bench("--clients", "1,4", "--duration", "2s", "--warmup", "0.5s", "--rounds", "1",
                   "--plot", str(chart))
    svg = ET.parse(chart).getroot()  # --plot: the chart of this run, one line per panel
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert [line.get("data-target") for line in lines] == ["ours", "ours"]
    assert doc["ceiling"] is None  # no etcd compared: no ceiling row
    assert doc["config"]["clients"] == [1, 4]
    assert set(doc["targets"]) == {"ours"}
    assert [(r["target"], r["clients"], r["round"]) for r in doc["runs"]] == \
        [("ours", 1, 1), ("ours", 4, 1)]
    assert [(r["target"], r["clients"]) for r in doc["results"]] == [("ours", 1), ("ours", 4)]
    for result in doc["results"]:
        assert RESULT_FIELDS <= set(result)
        assert result["ops"] > 0 and result["ops_s"] > 0
        assert result["errors"] == 0
        assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
        assert result["client_cpu_us_per_op"] > 0 and result["node_cpu_us_per_op"] > 0
    for run in doc["runs"]:
        assert run["writes"] == run["ops"] and run["reads"] == 0  # read ratio 0: puts only
    assert doc["ratios"] == []
    assert_nothing_left(doc)


@pytest.mark.integration
def test_bench_drives_the_cluster_with_the_asyncio_client() -> None:
    """``--client aio``: every worker's clients on one ``kvstore.aio.Client``, real nodes."""
    doc = kv_bench("--client", "aio", "--clients", "4", "--duration", "1s", "--warmup", "0.5s",
                   "--rounds", "1")
    assert doc["targets"]["ours"]["client"].startswith("kvstore.aio.Client")
    [result] = doc["results"]
    assert result["ops"] > 0 and result["errors"] == 0
    assert_nothing_left(doc)


@pytest.mark.integration
def test_bench_compared_with_raw_pysyncobj() -> None:
    doc = kv_bench("--compare", "raw", "--clients", "2", "--duration", "2s", "--warmup", "0.5s",
                   "--rounds", "1", "--read-ratio", "0.25")
    assert set(doc["targets"]) == {"ours", "raw"}
    assert "autoTick" in doc["targets"]["raw"]["timers"]  # the difference is said
    assert [r["target"] for r in doc["runs"]] == ["ours", "raw"]  # alternating, ours first
    for result in doc["results"]:
        assert result["ops"] > 0 and result["errors"] == 0, result
    for run in doc["runs"]:
        assert run["reads"] > 0 and run["writes"] > 0
    (ratio,) = doc["ratios"]
    assert ratio["vs"] == "raw" and ratio["clients"] == 2
    assert ratio["ops_s"] > 0 and ratio["p50_ms"] > 0 and len(ratio["ops_s_per_round"]) == 1
    assert_nothing_left(doc)


@pytest.mark.integration
def test_bench_compares_the_stream_with_calls() -> None:
    """``--compare calls``: the same cluster, the same client, proposals in calls instead of on
    the stream; both described as such, alternating, with their ratio."""
    doc = kv_bench("--compare", "calls", "--clients", "2", "--duration", "1s", "--warmup",
                   "0.5s", "--rounds", "1")
    assert set(doc["targets"]) == {"ours", "ours-calls"}
    assert "ProposeStream" in doc["targets"]["ours"]["client"]
    assert "ProposeBatch calls" in doc["targets"]["ours-calls"]["client"]
    assert [r["target"] for r in doc["runs"]] == ["ours", "ours-calls"]
    for result in doc["results"]:
        assert result["ops"] > 0 and result["errors"] == 0, result
    (ratio,) = doc["ratios"]
    assert ratio["vs"] == "ours-calls" and ratio["ops_s"] > 0
    assert doc["leftover_processes"] == []


# -- without processes ---------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 0.5) == 50.0
    assert stats.percentile(values, 0.9) == 90.0
    assert stats.percentile(values, 0.99) == 99.0
    assert stats.percentile(values, 1.0) == 100.0
    assert stats.percentile([7.0], 0.99) == 7.0
    assert stats.percentile([], 0.5) == 0.0


def test_summary_and_medians() -> None:
    result = RunResult(latencies=[0.001, 0.002, 0.003, 0.004], writes=4,
                       errors=Counter({"Unavailable": 1}), client_cpu=0.004, node_cpu=0.008,
                       busy_cpu=0.02)
    run = stats.summarize(result, duration=2.0)
    assert run["ops"] == 4 and run["ops_s"] == 2.0 and run["errors"] == 1
    assert run["p50_ms"] == pytest.approx(2.0) and run["max_ms"] == pytest.approx(4.0)
    assert run["node_cpu_us_per_op"] == pytest.approx(2000.0)
    assert run["client_cpu_us_per_op"] == pytest.approx(1000.0)
    assert run["other_cores"] == pytest.approx(0.004)
    other = {**run, "ops_s": 4.0, "p50_ms": 1.0, "errors": 0}
    third = {**run, "ops_s": 3.0, "p50_ms": 5.0, "errors": 2}
    median = stats.median_of_runs([run, other, third])
    assert median["ops_s"] == 3.0 and median["p50_ms"] == pytest.approx(2.0)
    assert median["errors"] == 3 and median["rounds"] == 3


def test_text_report_has_the_table_and_the_ratios() -> None:
    row = {"ops": 10, "ops_s": 100.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0,
           "max_ms": 4.0, "errors": 0, "client_cpu_us_per_op": 50.0, "node_cpu_us_per_op": 900.0,
           "node_cores": 0.09, "other_cores": None, "rounds": 1}
    doc = {
        "config": {"workload": "puts", "value_size": 100, "duration": 10.0, "warmup": 2.0,
                   "rounds": 1},
        "machine": {"cpus": 2, "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": None},
        "targets": {"ours": {"system": "kv", "dir": "/tmp/x"}, "etcd": {"system": "etcd"}},
        "results": [{"target": "ours", "clients": 1, **row},
                    {"target": "etcd", "clients": 1, **row, "ops_s": 50.0}],
        "ratios": [{"vs": "etcd", "clients": 1, "ops_s": 2.0, "p50_ms": 1.0, "p99_ms": 1.0,
                    "node_cpu_us_per_op": 1.0, "ops_s_per_round": [2.0]}],
        "leftover_processes": [],
    }
    text = "\n".join(text_report(doc))
    assert "| ours   | 1       | 100" in text
    assert "ours/etcd" in text and "2.00" in text
    assert "/tmp/x" not in text


def test_a_missing_etcd_is_one_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.bench import etcd

    monkeypatch.setattr(etcd.shutil, "which", lambda _name: None)
    outcome = CliRunner().invoke(bench, ["--compare", "etcd", "--clients", "1"])
    assert outcome.exit_code != 0
    assert "apt-get install etcd-server" in str(outcome.exception)


def test_compare_calls_needs_the_stream() -> None:
    outcome = CliRunner().invoke(bench, ["--compare", "calls", "--no-stream"])
    assert outcome.exit_code != 0
    assert "needs --stream" in str(outcome.exception)


def test_compare_noop_needs_sessions_on() -> None:
    outcome = CliRunner().invoke(bench, ["--compare", "noop", "--sessions", "off"])
    assert outcome.exit_code != 0
    assert "needs --sessions on" in str(outcome.exception)


@pytest.mark.parametrize("server", ["sync", "aio"])
def test_the_grpc_ceiling_benchmark_runs_both_servers_with_a_handoff(server: str) -> None:
    """``benchmarks/grpc_ceiling.py``, the bound the README's performance section cites."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "grpc_ceiling.py")
    done = subprocess.run([sys.executable, script, "--clients", "2", "--workers", "1",
                           "--duration", "0.5", "--warmup", "0.2", "--server", server,
                           "--handoff", "0.001", "--json"],
                          capture_output=True, text=True, timeout=RUN_DEADLINE, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [(row["server"], row["clients"], row["errors"]) for row in rows] == [(server, 2, 0)]
    assert rows[0]["ops_per_s"] > 0
