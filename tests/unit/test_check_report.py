"""``kvstore.check.report``: the HTML page of a ``kv check`` run, checked through its structure.

The SVG timeline is cut out of the page and parsed as XML, so every test also checks that the
picture is well-formed whatever the values held.
"""

from __future__ import annotations

import random
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.check.history import Op
from kvstore.check.report import (
    PLOT_LEFT,
    PLOT_WIDTH,
    VIOLATION_COLOUR,
    render_html,
    write_report,
)

SVG = "{http://www.w3.org/2000/svg}"
MS = 1_000_000
T0 = 5_000 * MS  # histories start at an arbitrary monotonic time, not at 0


@dataclass
class Fault:
    kind: str
    target: str
    start_ns: int
    end_ns: int | None


@dataclass
class Violation:
    kind: str
    key: str
    message: str
    ops: list[int] = field(default_factory=list)


NASTY = '<script>&"'


def small_history() -> tuple[list[Op], list[Any], list[Violation], dict[str, Any]]:
    """Three clients over 1.2 s, every op wide enough on screen to get its own bar."""

    def op(
        i: int, p: int, kind: str, value: Any, start_ms: int, end_ms: int | None, status: str,
        result: Any = None,
    ) -> Op:
        end = None if end_ms is None else T0 + end_ms * MS
        return Op(i, p, kind, "x", value, T0 + start_ms * MS, end, status, result)

    ops = [
        op(0, 0, "put", 1, 0, 100, "ok"),
        op(1, 1, "get", None, 50, 120, "ok", 1),
        op(2, 2, "put", NASTY, 150, 260, "ok"),
        op(3, 0, "cas", (1, 2), 200, 300, "fail", "precondition"),
        op(4, 1, "put", 3, 400, None, "unknown"),
        op(5, 2, "get", None, 700, 800, "ok", 1),  # stale: NASTY was acknowledged at 260 ms
        op(6, 0, "get", None, 900, 1_200, "ok", NASTY),
    ]
    faults: list[Any] = [
        {"kind": "kill", "target": "n2", "start_ns": T0 + 300 * MS, "end_ns": T0 + 500 * MS},
        Fault("partition", "{n1} | {n2,n3}", T0 + 600 * MS, T0 + 1_000 * MS),
    ]
    message = "get saw 1 after put of '<script>' returned"
    violations = [Violation("stale-read", "x", message, [2, 5])]
    summary = {"verdict": "invalid", "seed": 7, "workload": "register", "counts": {"ok": 5}}
    return ops, faults, violations, summary


def svg_of(page: str) -> ET.Element:
    match = re.search(r"<svg\b.*?</svg>", page, re.S)
    assert match, "no SVG in the page"
    return ET.fromstring(match.group(0))


def classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def op_rects(svg: ET.Element) -> list[ET.Element]:
    return [r for r in svg.iter(f"{SVG}rect") if "op" in classes(r)]


def merged_rects(svg: ET.Element) -> list[ET.Element]:
    return [r for r in svg.iter(f"{SVG}rect") if "merged" in classes(r)]


def test_one_bar_per_op_coloured_by_status() -> None:
    ops, faults, violations, summary = small_history()
    svg = svg_of(render_html(ops, faults, violations, summary))
    rects = op_rects(svg)
    assert sorted(int(r.get("data-op", "")) for r in rects) == [op.index for op in ops]
    assert not merged_rects(svg)
    status = {int(r.get("data-op", "")): classes(r) - {"op"} for r in rects}
    assert status == {op.index: {op.status} for op in ops}
    titles = {int(r.get("data-op", "")): r.findtext(f"{SVG}title") for r in rects}
    assert titles[3].startswith("#3 p0 cas x (1, 2) → fail 'precondition'")


def test_unknown_op_without_return_is_hatched_to_the_end() -> None:
    ops, faults, violations, summary = small_history()
    svg = svg_of(render_html(ops, faults, violations, summary))
    (bar,) = [r for r in op_rects(svg) if r.get("data-op") == "4"]
    assert bar.get("fill") == "url(#open-unknown)"
    assert float(bar.get("x", "")) + float(bar.get("width", "")) > PLOT_LEFT + PLOT_WIDTH - 1
    assert "no return" in (bar.findtext(f"{SVG}title") or "")


def test_fault_bands_span_the_lanes_and_are_labelled() -> None:
    ops, faults, violations, summary = small_history()
    svg = svg_of(render_html(ops, faults, violations, summary))
    bands = {
        next(iter(classes(g) - {"fault"})): g
        for g in svg.iter(f"{SVG}g")
        if "fault" in classes(g)
    }
    assert set(bands) == {"kill", "partition"}
    assert bands["kill"].findtext(f"{SVG}text") == "kill n2"
    assert bands["partition"].findtext(f"{SVG}text") == "partition {n1} | {n2,n3}"
    lane_bottoms = [float(r.get("y", "")) + float(r.get("height", "")) for r in op_rects(svg)]
    for group in bands.values():
        band = group.find(f"{SVG}rect")
        assert band is not None
        assert float(band.get("y", "")) < min(float(r.get("y", "")) for r in op_rects(svg))
        assert float(band.get("y", "")) + float(band.get("height", "")) >= max(lane_bottoms)
    # The kill ran from 300 ms to 500 ms of a 1.2 s history.
    kill = bands["kill"].find(f"{SVG}rect")
    assert kill is not None
    assert abs(float(kill.get("x", "")) - (PLOT_LEFT + PLOT_WIDTH * 0.25)) < 0.1
    assert abs(float(kill.get("width", "")) - PLOT_WIDTH / 6) < 0.2


def test_violation_ops_are_outlined_and_listed() -> None:
    ops, faults, violations, summary = small_history()
    page = render_html(ops, faults, violations, summary)
    svg = svg_of(page)
    links = [a for a in svg.iter(f"{SVG}a") if a.get("href") == "#violation-1"]
    outlined = {}
    for link in links:
        rect = link.find(f"{SVG}rect")
        assert rect is not None and rect.get("stroke") == VIOLATION_COLOUR
        outlined[rect.get("data-op")] = rect
    assert set(outlined) == {"2", "5"}
    (bar,) = [r for r in op_rects(svg) if r.get("data-op") == "5"]
    assert float(outlined["5"].get("x", "")) < float(bar.get("x", ""))  # a frame around the bar

    item = re.search(r'<li id="violation-1">.*?</li>', page, re.S)
    assert item, "violation not listed"
    text = item.group(0)
    assert "stale-read" in text and "<code>x</code>" in text
    assert "get saw 1 after put of &#x27;&lt;script&gt;&#x27; returned" in text
    rows = re.findall(r'<tr><td class="num">(\d+)</td>', text)
    assert rows == ["2", "5"]
    assert "Violations (1)" in page


def test_text_is_escaped_everywhere() -> None:
    ops, faults, violations, summary = small_history()
    summary["note"] = NASTY
    page = render_html(ops, faults, violations, summary, title=f"run {NASTY}")
    assert "<script>" not in page
    assert "&lt;script&gt;&amp;&quot;" in page  # title, summary, violation table
    svg = svg_of(page)
    titles = [r.findtext(f"{SVG}title") or "" for r in op_rects(svg)]
    assert any(repr(NASTY) in t for t in titles)  # the XML parser undid the escaping exactly


def test_characters_xml_cannot_carry_are_replaced(tmp_path: Path) -> None:
    ops, faults, violations, summary = small_history()
    ops[0].value = "nul\x00 bell\x07 bad\udc80 replaced\ufffd"
    ops[1].result = b"\xff\xfe"
    faults[1].target = "n1\x1b[31m"
    path = write_report(tmp_path / "sub" / "report.html", ops, faults, violations, summary)
    page = path.read_text(encoding="utf-8")
    svg_of(page)  # well-formed despite the control characters
    assert "\x00" not in page and "\x1b" not in page
    assert "replaced\ufffd" in page  # a real replacement character passes through


def test_empty_history_renders() -> None:
    page = render_html([], [], [], {})
    svg = svg_of(page)
    assert not op_rects(svg)
    assert "no operations" in page
    assert "None found." in page


def test_rendering_is_deterministic() -> None:
    history = small_history()
    assert render_html(*history) == render_html(*small_history())


def test_write_report_returns_the_path(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    assert write_report(path, *small_history(), title="t") == path
    assert path.read_text(encoding="utf-8") == render_html(*small_history(), title="t")


def test_tiny_ok_bars_merge_but_others_stay_visible() -> None:
    """1000 back-to-back 1 ms ops in one second: sub-pixel ok ops merge; the rest do not."""
    ops = []
    for i in range(1000):
        ops.append(Op(i, 0, "put", "x", i, T0 + i * MS, T0 + i * MS + 900_000, "ok", None))
    ops[300].status = "fail"
    ops[600].status = "unknown"
    violations = [Violation("lost-write", "x", "put 800 never read", [800])]
    page = render_html(ops, [], violations, {})
    svg = svg_of(page)
    merged = merged_rects(svg)
    singles = {int(r.get("data-op", "")) for r in op_rects(svg)}
    assert {300, 600, 800} <= singles
    assert sum(int(r.get("data-count", "")) for r in merged) + len(singles) == len(ops)
    assert len(merged) + len(singles) < 20
    assert f"{sum(int(r.get('data-count', '')) for r in merged):,} ok ops" in page
    assert "merged bars" in page


def big_history(
    n: int, processes: int, seed: int = 1
) -> tuple[list[Op], list[Fault], list[Violation]]:
    """``n`` random ops, mostly ok, by ``processes`` clients; nine kills; one violation."""
    rng = random.Random(seed)
    clock = [T0] * processes
    ops = []
    for i in range(n):
        p = rng.randrange(processes)
        call = clock[p] + rng.randrange(5 * MS)
        ret = call + rng.randrange(MS, 40 * MS)
        status = rng.choices(["ok", "fail", "unknown"], [90, 7, 3])[0]
        value = rng.choice([rng.randrange(100), "v" * rng.randrange(300), [1, 2, 3]])
        kind = rng.choice(["put", "get", "cas"])
        ops.append(Op(i, p, kind, f"k{i % 7}", value, call, ret, status, None))
        clock[p] = ret
    end = max(clock)
    starts = [T0 + (end - T0) * k // 10 for k in range(1, 10)]
    faults = [Fault("kill", f"n{k % 3 + 1}", t, t + 2 * 10**9) for k, t in enumerate(starts)]
    return ops, faults, [Violation("stale-read", "k1", "stale", [100, 10_000, 19_999])]


def test_twenty_thousand_ops_render_fast_and_small(tmp_path: Path) -> None:
    ops, faults, violations = big_history(20_000, 10)
    started = time.perf_counter()
    path = write_report(tmp_path / "big.html", ops, faults, violations, {"ops": len(ops)})
    elapsed = time.perf_counter() - started
    size = path.stat().st_size
    print(f"20k ops: rendered and written in {elapsed:.3f} s, {size / 1e6:.2f} MB")
    assert elapsed < 5.0
    assert size < 3_000_000
    svg = svg_of(path.read_text(encoding="utf-8"))
    singles = {int(r.get("data-op", "")) for r in op_rects(svg)}
    merged = sum(int(r.get("data-count", "")) for r in merged_rects(svg))
    assert merged + len(singles) == len(ops)
    never_merged = {op.index for op in ops if op.status != "ok"} | {100, 10_000, 19_999}
    assert never_merged <= singles
