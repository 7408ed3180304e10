"""The ``kv check`` report's availability chart, lane labels and summary in words (issue 13).

The chart is the page's second SVG; it is parsed as XML, so these tests also check that it is
well-formed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from cli.check_run import FINAL_LABEL, FINAL_NOTE, FINAL_PROCESS, SUMMARY_LABELS
from kvstore.check.history import Op
from kvstore.check.report import _Scale, render_html, throughput_bins

SVG = "{http://www.w3.org/2000/svg}"
MS = 1_000_000
T0 = 7_000 * MS


def op(index: int, process: int, start_ms: float, end_ms: float | None,
       status: str = "ok") -> Op:
    end = None if end_ms is None else T0 + int(end_ms * MS)
    return Op(index, process, "incr", "counter/0", 1, T0 + int(start_ms * MS), end, status, 1)


def outage_history() -> tuple[list[Op], list[dict[str, Any]]]:
    """Ten seconds, 10 ok ops per second with 10 ms latency, none from 4 s to 6 s (a kill), and
    one slow op returning just after it."""
    ops = []
    for tenth in range(100):
        start = tenth * 100.0
        if 4_000 <= start < 6_000:
            continue
        ops.append(op(len(ops), tenth % 4, start, start + 10))
    ops.append(op(len(ops), 9, 3_990, 6_050))  # waited out the fault: 2,060 ms
    ops.append(op(len(ops), 9, 5_000, None, "unknown"))
    ops.append(op(len(ops), 8, 4_500, 4_700, "fail"))  # answered, but not ok: no throughput
    faults = [{"kind": "kill", "target": "n1", "start_ns": T0 + 4_000 * MS,
               "end_ns": T0 + 6_000 * MS}]
    return ops, faults


def svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", page, re.S)]


def test_bins_count_ok_ops_by_return_and_take_their_p99() -> None:
    ops, faults = outage_history()
    bins = throughput_bins(ops, _Scale.fit(ops, faults))
    width = bins[0].end_ns - bins[0].start_ns
    assert width == 200 * MS  # 10 s in about 80 slices: 0.2 s, a 1-2-5 step
    by_second = {round((b.start_ns - T0) / 1e9, 1): b for b in bins}
    assert by_second[1.0].ok == 2 and by_second[1.0].ops_per_s == pytest.approx(10.0)
    assert by_second[1.0].p99_ms == pytest.approx(10.0)
    assert all(by_second[t / 10].ok == 0 and by_second[t / 10].p99_ms is None
               for t in range(40, 60, 2))  # the outage: nothing answered, no p99
    assert by_second[6.0].ok == 3 and by_second[6.0].p99_ms == pytest.approx(2_060.0)
    assert sum(b.ok for b in bins) == len([o for o in ops if o.status == "ok"])


def test_the_chart_is_under_the_timeline_with_the_fault_bands() -> None:
    ops, faults = outage_history()
    page = render_html(ops, faults, [], {"verdict": "valid"})
    timeline, chart = svgs(page)
    assert "timeline" in timeline.get("class", "") and chart.get("class") == "throughput"
    assert page.index('class="timeline"') < page.index("<h2>Availability</h2>") < page.index(
        'class="throughput"')
    bins = [r for r in chart.iter(f"{SVG}rect") if r.get("class") == "bin"]
    assert len(bins) == 50 and sum(int(r.get("data-ok", "")) for r in bins) == 81
    empty = [r for r in bins if r.get("data-ok") == "0"]
    assert len(empty) == 10 and all(float(r.get("height", "")) == 0 for r in empty)
    band = next(r for r in chart.iter(f"{SVG}rect") if "band" in r.get("class", ""))
    timeline_band = next(r for r in timeline.iter(f"{SVG}rect") if r.get("class") == "band")
    assert (band.get("x"), band.get("width")) == (timeline_band.get("x"),
                                                  timeline_band.get("width"))
    # The p99 line breaks at the outage: one stretch before it, one after.
    assert len(list(chart.iter(f"{SVG}polyline"))) == 2
    assert "p99 2060.0 ms" in "".join(t.text or "" for t in chart.iter(f"{SVG}title"))


def test_an_empty_history_still_draws_an_empty_chart() -> None:
    timeline, chart = svgs(render_html([], [], [], {}))
    assert chart.get("class") == "throughput"
    assert {r.get("data-ok") for r in chart.iter(f"{SVG}rect") if r.get("class") == "bin"} == {"0"}


def test_lanes_are_labelled_with_their_workload_and_the_final_reads_are_named() -> None:
    ops = [op(0, 0, 0, 10), op(1, 5, 0, 10), op(2, FINAL_PROCESS, 20, 30)]
    labels = {0: "register", 5: "list-append", FINAL_PROCESS: FINAL_LABEL}
    page = render_html(ops, [], [], {}, process_labels=labels, timeline_note=FINAL_NOTE)
    timeline = svgs(page)[0]
    names = [t.text for t in timeline.iter(f"{SVG}text") if (t.text or "").startswith("p")]
    assert names == ["p0 register", "p5 list-append", "p10000 final reads"]
    assert "p10000 final reads, is the reader that takes every workload" in page.replace(
        "&#x27;", "'")


def test_summary_keys_are_in_words() -> None:
    summary = {"verdict": "valid", "ops_ok": 5, "ops_unknown": 1, "duration_s": 2.0,
               "faults_injected": {}, "nemesis_errors": [], "some_new_key": 1}
    page = render_html([], [], [], summary, summary_labels=SUMMARY_LABELS)
    table = page[page.index('<table class="summary">'):page.index("</table>")]
    heads = re.findall(r"<th>(.*?)</th>", table)
    assert heads == ["Verdict", "Operations ok", "Operations with an unknown outcome",
                     "Duration (s)", "Faults injected", "Errors injecting faults", "Some new key"]
    assert "ops_ok" not in table and "<td>none</td>" in table
