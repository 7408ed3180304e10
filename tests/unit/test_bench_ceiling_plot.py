"""``kv bench``'s etcd ceiling row (``etcdctl check perf``), its ``--plot`` chart and the
``--client`` option, without processes: the parser on etcdctl's own output, the report rows,
the SVG, and the clean refusals.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from click.testing import CliRunner

from cli.bench import etcd_ceiling, load, plot
from cli.bench.runner import BenchOptions, Display, _document, _measure_ceiling, text_report
from cli.bench_cmd import bench

# etcdctl 3.4's output, as it prints it (progress bar on the first line).
FAILED_RUN = """\
 60 / 60 Boooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooo! 100.00% 1m0s
FAIL: Throughput too low: 6491 writes/s
PASS: Slowest request took 0.204441s
PASS: Stddev is 0.023631s
FAIL
"""
PASSED_RUN = """\
PASS: Throughput is 7998 writes/s
PASS: Slowest request took 0.468174s
PASS: Stddev is 0.028241s
PASS
"""
SLOW_RUN = """\
FAIL: too many errors
FAIL: ERROR(context deadline exceeded) -> 12
FAIL: ERROR(etcdserver: too many requests) -> 3
FAIL: Throughput too low: 2811 writes/s
Slowest request took too long: 1.786915s
Stddev too high: 0.163215s
FAIL
"""


def test_a_failed_check_is_a_measurement_with_its_throughput() -> None:
    found = etcd_ceiling.parse(FAILED_RUN)
    assert found.ops_s == 6491
    assert found.slowest_ms == pytest.approx(204.441)
    assert found.stddev_ms == pytest.approx(23.631)
    assert found.verdict == "FAIL" and found.errors == 0
    assert found.note == "FAIL: Throughput too low: 6491 writes/s"


def test_a_passed_check() -> None:
    found = etcd_ceiling.parse(PASSED_RUN)
    assert (found.ops_s, found.verdict, found.note) == (7998, "PASS", "")
    assert found.slowest_ms == pytest.approx(468.174)


def test_errors_and_slow_requests_are_counted_and_said() -> None:
    found = etcd_ceiling.parse(SLOW_RUN)
    assert found.ops_s == 2811 and found.errors == 15
    assert found.slowest_ms == pytest.approx(1786.915)
    assert found.stddev_ms == pytest.approx(163.215)
    assert "Slowest request took too long" in found.note and "Stddev too high" in found.note


def test_output_without_a_throughput_gives_no_figure_and_says_why() -> None:
    found = etcd_ceiling.parse('Error: prefix "/etcdctl-check-perf/" has keys\n')
    assert found.ops_s is None and "has keys" in found.note


def test_a_missing_etcdctl_is_a_row_that_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_ceiling.shutil, "which", lambda _name: None)
    found = etcd_ceiling.measure(["127.0.0.1:1"])
    assert found.ops_s is None and "apt-get install etcd-client" in found.note

    class FakeEtcd:
        name = "etcd"

        def current_leader(self) -> str:
            raise AssertionError("no etcdctl: the cluster is not even asked")

    lines: list[str] = []
    display = Display()
    display.line = lines.append  # type: ignore[method-assign]
    row = _measure_ceiling([FakeEtcd()], display)  # type: ignore[list-item]
    assert row["ops_s"] is None and "etcd-client" in row["note"]
    assert "not measured" in lines[0]


def _doc(ceiling: dict[str, Any] | None) -> dict[str, Any]:
    def row(target: str, clients: int, ops_s: float, p99: float) -> dict[str, Any]:
        return {"target": target, "clients": clients, "rounds": 3, "ops": 100, "ops_s": ops_s,
                "p50_ms": p99 / 3, "p90_ms": p99 / 2, "p99_ms": p99, "max_ms": p99 * 2,
                "errors": 0, "client_cpu_us_per_op": 50.0, "node_cpu_us_per_op": 900.0,
                "node_cores": 0.5, "other_cores": 0.1}

    runs = [{**row(t, c, v, p), "round": 1} for t, c, v, p in (
        ("ours", 1, 500.0, 3.0), ("etcd", 1, 600.0, 2.5),
        ("ours", 16, 4000.0, 9.0), ("etcd", 16, 3000.0, 12.0))]
    options = BenchOptions(clients=[1, 16], duration=5.0, warmup=1.0, rounds=1,
                           compare=["etcd"], ceiling=ceiling is not None)

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def describe(self) -> dict[str, object]:
            return {"system": self.name}

    return _document(options, [Named("ours"), Named("etcd")], runs,  # type: ignore[list-item]
                     [], None, None, 4, ceiling)


def test_the_ceiling_is_a_row_of_the_table_and_of_the_json() -> None:
    doc = _doc(etcd_ceiling.parse(FAILED_RUN).as_dict())
    assert doc["ceiling"]["ops_s"] == 6491 and doc["ceiling"]["clients"] == 500
    assert doc["ceiling"]["ours_peak_ops_s"] == 4000.0
    assert doc["ceiling"]["ours_peak_ratio"] == pytest.approx(4000 / 6491)
    text = "\n".join(text_report(doc))
    assert "| etcd ceiling (etcdctl check perf) | 500" in text
    flat = " ".join(text.split())  # the notes are wrapped
    assert "6,491" in flat and "0.62x this ceiling" in flat
    assert all(len(line) <= 100 for line in text.splitlines())


def test_a_ceiling_not_measured_says_why_in_the_report() -> None:
    doc = _doc(etcd_ceiling.Ceiling(None, note=etcd_ceiling.INSTALL_HINT).as_dict())
    text = " ".join(" ".join(text_report(doc)).split())
    assert "not measured (etcdctl not found" in text
    assert doc["ceiling"]["ours_peak_ratio"] is None


def test_no_ceiling_row_without_the_option() -> None:
    doc = _doc(None)
    assert doc["ceiling"] is None
    assert "etcd ceiling" not in "\n".join(text_report(doc))


SVG = "{http://www.w3.org/2000/svg}"


def test_the_plot_has_one_line_per_target_in_each_panel_and_the_ceiling() -> None:
    svg = plot.render_svg(_doc(etcd_ceiling.parse(PASSED_RUN).as_dict()))
    root = ET.fromstring(svg)  # well-formed
    lines = root.findall(f"{SVG}polyline")
    assert sorted(p.get("data-target") or "" for p in lines) == ["etcd", "etcd", "ours", "ours"]
    points = [[tuple(map(float, xy.split(","))) for xy in p.get("points", "").split()]
              for p in lines]
    assert all(len(p) == 2 for p in points)  # 1 and 16 clients
    rate_ours = points[0]
    assert rate_ours[1][0] > rate_ours[0][0]  # more clients to the right
    assert rate_ours[1][1] < rate_ours[0][1]  # 4000 ops/s above 500 ops/s (y grows down)
    (ceiling,) = root.findall(f"{SVG}line[@class='ceiling']")
    assert "7,998" in svg
    # the ceiling (7998) sets the axis: 10,000 at the top, so the line is near the top
    assert float(ceiling.get("y1", 0)) < rate_ours[1][1]


def test_the_plot_without_a_ceiling_and_with_one_client_count() -> None:
    doc = _doc(None)
    doc["results"] = [r for r in doc["results"] if r["clients"] == 1]
    root = ET.fromstring(plot.render_svg(doc))
    assert root.findall(f"{SVG}line[@class='ceiling']") == []
    assert len(root.findall(f"{SVG}circle")) == 4  # 2 targets x 2 panels, no lines needed


def test_nice_axis_maxima() -> None:
    assert [plot.nice_ceiling(v) for v in (0, 0.3, 7, 7998, 12_000)] == [1, 0.5, 10, 10_000,
                                                                          20_000]


def test_the_aio_driver_is_picked_by_the_client_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    picked: list[str] = []
    monkeypatch.setattr(load, "AioOursDriver", lambda params: picked.append("aio") or "aio")
    monkeypatch.setattr(load, "DRIVERS", {"ours": lambda params: "sync", "etcd": lambda p: "etcd"})
    assert load.make_driver("ours", {"client": "aio"}) == "aio"
    assert load.make_driver("ours", {"client": "sync"}) == "sync"
    assert load.make_driver("ours", {}) == "sync"
    assert load.make_driver("etcd", {"client": "aio"}) == "etcd"  # etcd has one client


@pytest.mark.parametrize("args, said", [
    (["--ceiling"], "needs --compare etcd"),
    (["--plot", "chart.png"], "name a .svg file"),
    (["--plot", "/no/such/dir/chart.svg"], "no directory"),
])
def test_bad_options_are_refused_before_anything_starts(args: list[str], said: str) -> None:
    outcome = CliRunner().invoke(bench, ["--clients", "1", *args])
    assert outcome.exit_code != 0 and said in str(outcome.exception)


def test_the_aio_driver_runs_every_call_on_one_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--client aio``'s driver, with a stand-in for ``kvstore.aio.Client`` (no node here)."""
    import asyncio

    calls: list[tuple[str, Any]] = []
    loops: set[int] = set()

    class Session:
        def proposal_completed(self) -> None:
            calls.append(("completed", None))

    class FakeAioClient:
        def __init__(self, endpoints: list[str], **kwargs: Any) -> None:
            calls.append(("client", (tuple(endpoints), sorted(kwargs))))

        async def sync_get_session(self) -> Session:
            loops.add(id(asyncio.get_running_loop()))
            return Session()

        async def sync_propose(self, session: Session, command: Any, timeout: float) -> None:
            loops.add(id(asyncio.get_running_loop()))
            calls.append(("propose", command.put.key))

        async def read(self, command: Any, consistency: str, timeout: float) -> None:
            calls.append(("read", consistency))

        async def sync_close_session(self, session: Session, timeout: float) -> None:
            calls.append(("close_session", None))

        async def close(self) -> None:
            calls.append(("close", None))

    monkeypatch.setattr("kvstore.aio.Client", FakeAioClient)
    params = {"endpoints": ["127.0.0.1:1"], "cluster_id": 5, "sessions": True,
              "consistency": "s", "op_timeout": 1.0, "dial_timeout": 1.0, "client": "aio"}
    driver = load.make_driver("ours", params)
    states = [driver.open(n) for n in range(3)]
    for state in states:
        driver.write(state, b"k", b"v")
        driver.read(state, b"k")
    for state in states:
        driver.close(state)
    driver.shutdown()  # type: ignore[attr-defined]
    assert calls.count(("client", (("127.0.0.1:1",), [
        "cluster_id", "dial_timeout", "streaming", "timeout", "tls"]))) == 1
    assert calls.count(("propose", b"k")) == 3 and calls.count(("completed", None)) == 3
    assert calls.count(("read", "serializable")) == 3
    assert calls.count(("close_session", None)) == 3 and calls[-1] == ("close", None)
    assert len(loops) == 1  # one event loop for every client of the worker
