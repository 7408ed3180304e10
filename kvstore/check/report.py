"""Render a ``kv check`` run as one self-contained HTML page with an SVG timeline.

The page is what a person opens after a run that failed: a summary table, a timeline with one
lane per client process (each op a bar from call to return, faults as vertical bands over all
lanes), under it a chart of ok ops per second and p99 latency on the same time axis with the
same bands (so the cost of each fault in availability shows), then the violations with the ops
behind them. It loads nothing and needs no script: tooltips are SVG ``<title>`` elements, so
the file reads the same in any browser, offline.

Inputs are duck-typed (attributes or dict keys) so that this module depends on nothing else in
``kvstore.check``:

- op: ``index, process, kind, key, value, call_ns, return_ns, status, result``
- fault: ``kind, target, start_ns, end_ns``
- violation: ``kind, key, message, ops`` (op indexes)

Large histories stay small and quick by drawing a run of sub-pixel ``ok`` bars in a lane as one
merged bar. ``fail``, ``unknown`` and violation ops are never merged and are drawn above the
``ok`` bars, so merging never hides them; the page says when it merged.
"""

from __future__ import annotations

import html
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Geometry of the SVG, in px.
PLOT_LEFT = 132  # room for the lane labels ("p12 list-append")
PLOT_WIDTH = 1100
PLOT_RIGHT = 56  # room for the chart's right axis (p99 latency)
LABEL_CHARS = 19  # lane labels are cut here
LEGEND_HEIGHT = 26
FAULT_ROW_HEIGHT = 15
LANES_HEIGHT = 560  # lanes share this height ...
LANE_MIN, LANE_MAX = 4.0, 22.0  # ... within these bounds per lane
AXIS_HEIGHT = 34
CHART_TOP = 30  # the chart's legend
CHART_HEIGHT = 170  # its plot area
CHART_BINS = 80  # about this many time bins, each a 1-2-5 number of seconds
CHAR_WIDTH = 6.4  # estimate of one character at the 11 px font, for placing labels

# An ok bar narrower than MERGE_MAX_PX that starts within MERGE_GAP_PX of the previous one in
# its lane joins it: such bars would only smear into each other on screen anyway.
MERGE_MAX_PX = 2.0
MERGE_GAP_PX = 1.0
MIN_BAR_PX = 1.0  # every bar gets at least this width ...
MIN_FLAGGED_PX = 3.0  # ... and a fail, unknown or violation op this much, to stay findable
BAR_GAP_PX = 0.6  # taken off each bar's end so that back-to-back ops in a lane stay apart

TOOLTIP_CHARS = 120  # values in tooltips are cut here: 20k tooltips must stay small
DETAIL_CHARS = 2000  # values in the violation tables are cut here

STATUS_COLOURS = {"ok": "#3a9e4f", "fail": "#b09a9a", "unknown": "#f0a000"}
OTHER_STATUS_COLOUR = "#999999"
FAULT_COLOURS = {"kill": "#d62728", "pause": "#1f77b4", "partition": "#9467bd", "delay": "#17a2b8",
                 "membership": "#2ca02c"}
"""A membership change is a band too, from its first call to its commit, labelled with the
step (``membership add n4 (learner)``, ``membership promote n4``, ``membership remove n2
(leader)``)."""
OTHER_FAULT_COLOUR = "#7f7f7f"
VIOLATION_COLOUR = "#d00000"
P99_COLOUR = "#c05000"

# Characters XML 1.0 cannot carry even as references (and lone surrogates, which UTF-8 cannot).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .6em; }
h2 { font-size: 1.15em; margin: 1.6em 0 .5em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, td.val { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.good { color: #1e7b34; font-weight: 700; }
.bad { color: #c00000; font-weight: 700; }
.note { color: #555; font-size: 13px; }
svg.timeline { max-width: 100%; height: auto; border: 1px solid #ddd; background: #fff; }
svg .op:hover, svg .merged:hover { stroke: #000; stroke-width: 1; }
ol.violations > li { margin-bottom: 1.2em; }
ol.violations > li:target { background: #fff3f3; }
"""


def render_html(
    ops: Sequence[Any],
    faults: Sequence[Any],
    violations: Sequence[Any],
    summary: Mapping[str, Any],
    title: str = "kv check",
    *,
    process_labels: Mapping[Any, str] | None = None,
    summary_labels: Mapping[str, str] | None = None,
    timeline_note: str = "",
) -> str:
    """The whole report page; a pure function of its inputs.

    ``process_labels`` names lanes (``{3: "counter"}`` labels lane p3 "p3 counter");
    ``summary_labels`` gives the summary's keys in words; ``timeline_note`` is said under the
    timeline's heading (what a named lane means, say).
    """
    flagged: dict[int, int] = {}  # op index -> number of the first violation that names it
    for number, violation in enumerate(violations, 1):
        for index in _get(violation, "ops") or ():
            flagged.setdefault(index, number)
    scale = _Scale.fit(ops, faults)
    svg, merged_ops, merged_bars = _timeline(ops, faults, flagged, scale, process_labels or {})
    if merged_ops:
        merge_note = (
            f"To stay readable, {merged_ops:,} ok ops too short to tell apart were drawn as "
            f"{merged_bars:,} merged bars (hover one for its range). Fail, unknown and violation "
            "ops are always drawn one by one, above the ok bars."
        )
    else:
        merge_note = "Every op is drawn as its own bar."
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
            f"<h1>{_esc(title)}</h1>\n",
            _summary_table(summary, summary_labels or {}),
            f"<h2>Timeline</h2>\n<p class=\"note\">{len(ops):,} ops by "
            f"{len({_get(op, 'process') for op in ops}):,} processes over "
            f"{scale.span_ns / 1e9:.3f} s, {len(faults):,} faults. Hover a bar for its details. "
            f"{merge_note} {_esc(timeline_note)}</p>\n",
            svg,
            _chart_section(ops, faults, scale),
            _violations_section(violations, ops, scale),
            _faults_section(faults, scale),
            "</body>\n</html>\n",
        ]
    )


def write_report(
    path: Path,
    ops: Sequence[Any],
    faults: Sequence[Any],
    violations: Sequence[Any],
    summary: Mapping[str, Any],
    title: str = "kv check",
    **labels: Any,
) -> Path:
    """Write the page to ``path`` (creating its folder) and return the path; ``labels`` are
    ``render_html``'s keyword arguments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(ops, faults, violations, summary, title, **labels),
                    encoding="utf-8")
    return path


# --- text ----------------------------------------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    """A field of an input, whether it is a dataclass-like object or a dict."""
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def _esc(text: object) -> str:
    """``text`` made safe for both HTML and XML: escaped, and without characters XML forbids."""
    return html.escape(_NOT_XML.sub("\ufffd", str(text)), quote=True)


def _show(value: object, limit: int) -> str:
    """A value as Python would write it (so "1" and 1 differ), cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _secs(seconds: float) -> str:
    return f"{seconds:.3f}"


# --- time scale ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """Maps nanosecond timestamps to seconds since the first call and to x in the SVG."""

    t0_ns: int
    span_ns: int

    @classmethod
    def fit(cls, ops: Sequence[Any], faults: Sequence[Any]) -> _Scale:
        calls = [_get(op, "call_ns") for op in ops]
        starts = [_get(fault, "start_ns") for fault in faults]
        t0 = min(calls) if calls else min(starts, default=0)
        times = [(_get(op, "call_ns"), _get(op, "return_ns")) for op in ops]
        times += [(_get(fault, "start_ns"), _get(fault, "end_ns")) for fault in faults]
        end = max((t for pair in times for t in pair if t is not None), default=t0)
        return cls(t0, end - t0 if end > t0 else 1_000_000_000)  # an instant still gets an axis

    @property
    def end_ns(self) -> int:
        return self.t0_ns + self.span_ns

    def seconds(self, t_ns: int) -> float:
        return (t_ns - self.t0_ns) / 1e9

    def x(self, t_ns: int) -> float:
        """x of a timestamp, clamped to the plot (a fault may start before the first call)."""
        fraction = min(max((t_ns - self.t0_ns) / self.span_ns, 0.0), 1.0)
        return PLOT_LEFT + fraction * PLOT_WIDTH


def _tick_step(span_s: float, target: int = 10) -> float:
    """The 1-2-5 step that puts about ``target`` ticks on the axis."""
    raw = span_s / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


# --- timeline ------------------------------------------------------------------------------

_Span = tuple[Any, float, float]  # an op and the x where its bar starts and ends


@dataclass
class _Layout:
    """Vertical positions: legend, rows of fault labels, then one lane per process."""

    fault_rows: int
    lanes: list[Any]
    labels: Mapping[Any, str] = field(default_factory=dict)

    @property
    def lanes_top(self) -> float:
        return LEGEND_HEIGHT + self.fault_rows * FAULT_ROW_HEIGHT + 6

    @property
    def lane_height(self) -> float:
        return min(max(LANES_HEIGHT / max(len(self.lanes), 1), LANE_MIN), LANE_MAX)

    @property
    def lanes_bottom(self) -> float:
        return self.lanes_top + self.lane_height * max(len(self.lanes), 1)

    @property
    def height(self) -> float:
        return self.lanes_bottom + AXIS_HEIGHT

    def bar_y(self, lane: int) -> tuple[float, float]:
        """Top and height of the bars in ``lane``: most of the lane, leaving a gap between."""
        h = self.lane_height
        return self.lanes_top + lane * h + h * 0.15, h * 0.7


def _timeline(
    ops: Sequence[Any], faults: Sequence[Any], flagged: Mapping[int, int], scale: _Scale,
    labels: Mapping[Any, str],
) -> tuple[str, int, int]:
    """The SVG, the number of ops drawn merged, and the number of merged bars they make."""
    by_lane: dict[Any, list[Any]] = defaultdict(list)
    for op in ops:
        by_lane[_get(op, "process")].append(op)
    lanes = sorted(by_lane)
    label_rows = _place_fault_labels(faults, scale)
    layout = _Layout(max(label_rows, default=-1) + 1, lanes, labels)
    width = PLOT_LEFT + PLOT_WIDTH + PLOT_RIGHT

    # Layers, bottom to top: open-ended unknown bars (translucent) under all other bars, ok bars
    # under the flagged ones (fail, unknown, in a violation) so that merging cannot cover them,
    # then the fault bands (tinting the bars, yet letting the mouse through) and the outlines.
    open_unknown: list[str] = []
    ok_bars: list[str] = []
    flagged_bars: list[str] = []
    outlines: list[str] = []
    merged_ops = merged_bars = 0
    for lane_number, process in enumerate(lanes):
        y, h = layout.bar_y(lane_number)
        ok_spans: list[_Span] = []
        for op in sorted(by_lane[process], key=lambda o: (_get(o, "call_ns"), _get(o, "index"))):
            status, index, returned = _get(op, "status"), _get(op, "index"), _get(op, "return_ns")
            x0 = scale.x(_get(op, "call_ns"))
            x1 = scale.x(returned if returned is not None else scale.end_ns)
            if status == "ok" and index not in flagged and returned is not None:
                ok_spans.append((op, x0, max(x1, x0 + MIN_BAR_PX)))
                continue
            x1 = max(x1, x0 + MIN_FLAGGED_PX)
            bar = _op_rect(op, x0, x1, y, h, scale)
            (open_unknown if status == "unknown" and returned is None else flagged_bars).append(bar)
            if index in flagged:
                outlines.append(_outline(op, flagged[index], x0, x1, y, h))
        for run in _merge_runs(ok_spans):
            if len(run) == 1:
                ok_bars.append(_op_rect(*run[0], y, h, scale))
            else:
                ok_bars.append(_merged_rect(run, y, h, scale))
                merged_ops += len(run)
                merged_bars += 1

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" '
        f'height="{layout.height:.0f}" viewBox="0 0 {width} {layout.height:.0f}" '
        'font-family="system-ui, sans-serif" font-size="11">\n',
        _defs(),
        f'<rect x="0" y="0" width="{width}" height="{layout.height:.0f}" fill="#fff"/>\n',
        _legend(faults),
        _lanes_background(layout),
        _axis(layout, scale),
        '<g class="layer-open-unknown">\n', *open_unknown, "</g>\n",
        '<g class="layer-ok">\n', *ok_bars, "</g>\n",
        '<g class="layer-flagged">\n', *flagged_bars, "</g>\n",
        _fault_bands(faults, label_rows, layout, scale),
        '<g class="layer-violations">\n', *outlines, "</g>\n",
    ]
    if not ops:
        middle = (layout.lanes_top + layout.lanes_bottom) / 2
        parts.append(
            f'<text x="{PLOT_LEFT + PLOT_WIDTH / 2:.0f}" y="{middle:.0f}" text-anchor="middle" '
            'fill="#888" font-size="14">no operations</text>\n'
        )
    parts.append("</svg>\n")
    return "".join(parts), merged_ops, merged_bars


def _merge_runs(spans: Sequence[_Span]) -> list[list[_Span]]:
    """Split a lane's ok bars, in call order, into runs that are drawn as one bar each.

    A bar joins the run before it when it and the run's last bar are both narrower than
    MERGE_MAX_PX and it starts within MERGE_GAP_PX of where the run ends.
    """
    runs: list[list[_Span]] = []
    run_end = 0.0
    for span in spans:
        _, x0, x1 = span
        if runs and _tiny(span) and _tiny(runs[-1][-1]) and x0 - run_end <= MERGE_GAP_PX:
            runs[-1].append(span)
            run_end = max(run_end, x1)
        else:
            runs.append([span])
            run_end = x1
    return runs


def _tiny(span: _Span) -> bool:
    return span[2] - span[1] < MERGE_MAX_PX


def _op_title(op: Any, scale: _Scale) -> str:
    """One op in two lines: what it did and what came back, then when."""
    value, result, returned = _get(op, "value"), _get(op, "result"), _get(op, "return_ns")
    what = f"#{_get(op, 'index')} p{_get(op, 'process')} {_get(op, 'kind')} {_get(op, 'key')}"
    if value is not None:
        what += f" {_show(value, TOOLTIP_CHARS)}"
    what += f" → {_get(op, 'status')}"
    if result is not None:
        what += f" {_show(result, TOOLTIP_CHARS)}"
    call_s = scale.seconds(_get(op, "call_ns"))
    if returned is None:
        when = f"{_secs(call_s)} s → no return"
    else:
        ms = (returned - _get(op, "call_ns")) / 1e6
        when = f"{_secs(call_s)} s → {_secs(scale.seconds(returned))} s ({ms:.1f} ms)"
    return _esc(f"{what}\n{when}")


def _op_rect(op: Any, x0: float, x1: float, y: float, h: float, scale: _Scale) -> str:
    status = _get(op, "status")
    if status == "unknown" and _get(op, "return_ns") is None:
        fill = 'fill="url(#open-unknown)"'
    else:
        fill = f'fill="{STATUS_COLOURS.get(status, OTHER_STATUS_COLOUR)}"'
    return (
        f'<rect class="op {_esc(status)}" data-op="{_esc(_get(op, "index"))}" x="{x0:.1f}" '
        f'y="{y:.1f}" width="{max(x1 - x0 - BAR_GAP_PX, MIN_BAR_PX):.1f}" height="{h:.1f}" {fill}>'
        f"<title>{_op_title(op, scale)}</title></rect>\n"
    )


def _merged_rect(run: list[_Span], y: float, h: float, scale: _Scale) -> str:
    first, last = run[0][0], run[-1][0]
    x0, x1 = run[0][1], max(x for _, _, x in run)
    start = scale.seconds(_get(first, "call_ns"))
    end = scale.seconds(max(_get(op, "return_ns") for op, _, _ in run))
    title = (
        f"{len(run)} ok ops merged, #{_get(first, 'index')} … #{_get(last, 'index')}\n"
        f"{_secs(start)} s → {_secs(end)} s"
    )
    return (
        f'<rect class="merged ok" data-count="{len(run)}" x="{x0:.1f}" y="{y:.1f}" '
        f'width="{max(x1 - x0 - BAR_GAP_PX, MIN_BAR_PX):.1f}" height="{h:.1f}" '
        f'fill="{STATUS_COLOURS["ok"]}">'
        f"<title>{_esc(title)}</title></rect>\n"
    )


def _outline(op: Any, violation: int, x0: float, x1: float, y: float, h: float) -> str:
    """A red frame around a violation op, linking to the violation's entry below the picture."""
    return (
        f'<a href="#violation-{violation}"><rect class="violation-op" '
        f'data-op="{_esc(_get(op, "index"))}" x="{x0 - 2:.1f}" y="{y - 2:.1f}" '
        f'width="{x1 - x0 + 4:.1f}" height="{h + 4:.1f}" fill="none" '
        f'stroke="{VIOLATION_COLOUR}" stroke-width="2.5">'
        f"<title>op #{_esc(_get(op, 'index'))}: part of violation {violation}</title></rect></a>\n"
    )


def _defs() -> str:
    """The hatching of unknown ops that never returned: they may take effect at any later time."""
    amber = STATUS_COLOURS["unknown"]
    return (
        '<defs><pattern id="open-unknown" patternUnits="userSpaceOnUse" width="6" height="6" '
        'patternTransform="rotate(45)">'
        f'<rect width="6" height="6" fill="{amber}" fill-opacity="0.18"/>'
        f'<line x1="1" y1="0" x2="1" y2="6" stroke="{amber}" stroke-width="2" '
        'stroke-opacity="0.8"/>'
        "</pattern></defs>\n"
    )


def _legend(faults: Sequence[Any]) -> str:
    """Swatches for the statuses, the outline, and each fault kind this run had."""
    items = [
        (f'fill="{STATUS_COLOURS["ok"]}"', "ok"),
        (f'fill="{STATUS_COLOURS["fail"]}"', "fail"),
        (f'fill="{STATUS_COLOURS["unknown"]}"', "unknown"),
        ('fill="url(#open-unknown)"', "unknown, no return"),
        (f'fill="none" stroke="{VIOLATION_COLOUR}" stroke-width="2.5"', "in a violation"),
    ]
    for kind in sorted({str(_get(f, "kind")) for f in faults}):
        colour = FAULT_COLOURS.get(kind, OTHER_FAULT_COLOUR)
        items.append((f'fill="{colour}" fill-opacity="0.2" stroke="{colour}"', f"{kind} (fault)"))
    parts, x = ['<g class="legend">\n'], float(PLOT_LEFT)
    for style, label in items:
        parts.append(
            f'<rect x="{x:.0f}" y="8" width="16" height="10" {style}/>'
            f'<text x="{x + 21:.0f}" y="17">{_esc(label)}</text>\n'
        )
        x += 21 + len(label) * CHAR_WIDTH + 18
    parts.append("</g>\n")
    return "".join(parts)


def _lanes_background(layout: _Layout) -> str:
    """Striped lanes with their process names; with many lanes only every few are named."""
    every = math.ceil(9 / layout.lane_height)
    font = min(11.0, layout.lane_height * 0.8 * every)
    parts = ['<g class="lanes">\n']
    for number, process in enumerate(layout.lanes):
        top = layout.lanes_top + number * layout.lane_height
        if number % 2:
            parts.append(
                f'<rect x="{PLOT_LEFT}" y="{top:.1f}" width="{PLOT_WIDTH}" '
                f'height="{layout.lane_height:.1f}" fill="#f3f4f6"/>\n'
            )
        if number % every == 0:
            parts.append(
                f'<text x="{PLOT_LEFT - 6}" y="{top + layout.lane_height / 2:.1f}" '
                f'text-anchor="end" dominant-baseline="central" font-size="{font:.0f}" '
                f'fill="#444">{_esc(_lane_label(process, layout.labels))}</text>\n'
            )
    parts.append("</g>\n")
    return "".join(parts)


def _lane_label(process: Any, labels: Mapping[Any, str]) -> str:
    """``p3``, or ``p3 counter`` when the process has a label (cut to LABEL_CHARS)."""
    label = f"p{process} {labels[process]}" if process in labels else f"p{process}"
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def _fault_label(fault: Any) -> str:
    return f"{_get(fault, 'kind')} {_get(fault, 'target')}"


def _place_fault_labels(faults: Sequence[Any], scale: _Scale) -> list[int]:
    """The label row of each fault: the first row where its label clears the one before it."""
    row_ends: list[float] = []
    rows = [0] * len(faults)
    order = sorted(range(len(faults)), key=lambda i: _get(faults[i], "start_ns"))
    for i in order:
        x = scale.x(_get(faults[i], "start_ns"))
        end = x + 4 + len(_fault_label(faults[i])) * CHAR_WIDTH
        row = next((r for r, last in enumerate(row_ends) if last < x), len(row_ends))
        if row == len(row_ends):
            row_ends.append(end)
        row_ends[row] = end
        rows[i] = row
    return rows


def _fault_bands(
    faults: Sequence[Any], rows: Sequence[int], layout: _Layout, scale: _Scale
) -> str:
    """A translucent band over every lane for each fault, labelled in the strip above the lanes."""
    parts = ['<g class="faults">\n']
    for fault, row in zip(faults, rows):
        kind, start, end = str(_get(fault, "kind")), _get(fault, "start_ns"), _get(fault, "end_ns")
        colour = FAULT_COLOURS.get(kind, OTHER_FAULT_COLOUR)
        x0 = scale.x(start)
        x1 = max(scale.x(end if end is not None else scale.end_ns), x0 + 2)
        top = LEGEND_HEIGHT + row * FAULT_ROW_HEIGHT
        until = "not healed" if end is None else f"{_secs(scale.seconds(end))} s"
        title = f"{_fault_label(fault)}\n{_secs(scale.seconds(start))} s → {until}"
        parts.append(
            f'<g class="fault {_esc(kind)}"><title>{_esc(title)}</title>'
            f'<rect class="band" x="{x0:.1f}" y="{top:.1f}" width="{x1 - x0:.1f}" '
            f'height="{layout.lanes_bottom - top:.1f}" fill="{colour}" fill-opacity="0.15" '
            'pointer-events="none"/>'
            f'<line x1="{x0:.1f}" y1="{top:.1f}" x2="{x0:.1f}" y2="{layout.lanes_bottom:.1f}" '
            f'stroke="{colour}" stroke-opacity="0.7"/>'
            f'<text x="{x0 + 3:.1f}" y="{top + 11:.1f}" fill="{colour}" font-weight="600">'
            f"{_esc(_fault_label(fault))}</text></g>\n"
        )
    parts.append("</g>\n")
    return "".join(parts)


def _axis(layout: _Layout, scale: _Scale) -> str:
    """Ticks in seconds since the first call, with faint grid lines through the lanes."""
    return _time_axis(layout.lanes_top, layout.lanes_bottom, scale)


def _time_axis(top: float, bottom: float, scale: _Scale) -> str:
    """The time axis at ``bottom``, with faint grid lines up to ``top``."""
    span_s = scale.span_ns / 1e9
    step = _tick_step(span_s)
    decimals = max(0, -math.floor(math.log10(step)))
    parts = [
        '<g class="axis">\n',
        f'<line x1="{PLOT_LEFT}" y1="{bottom:.1f}" x2="{PLOT_LEFT + PLOT_WIDTH}" '
        f'y2="{bottom:.1f}" stroke="#555"/>\n',
    ]
    for k in range(int(span_s / step + 1e-9) + 1):
        x = PLOT_LEFT + k * step / span_s * PLOT_WIDTH
        parts.append(
            f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" '
            'stroke="#000" stroke-opacity="0.07"/>'
            f'<line x1="{x:.1f}" y1="{bottom:.1f}" x2="{x:.1f}" y2="{bottom + 5:.1f}" '
            'stroke="#555"/>'
            f'<text x="{x:.1f}" y="{bottom + 17:.1f}" text-anchor="middle" fill="#444">'
            f"{k * step:.{decimals}f}</text>\n"
        )
    parts.append(
        f'<text x="{PLOT_LEFT + PLOT_WIDTH}" y="{bottom + 30:.1f}" text-anchor="end" '
        'fill="#666">seconds since the first call</text>\n</g>\n'
    )
    return "".join(parts)


# --- availability chart ------------------------------------------------------------------


@dataclass(frozen=True)
class Bin:
    """One slice of time in the chart: the ok ops that returned in it, and their p99."""

    start_ns: int
    end_ns: int
    ok: int
    p99_ms: float | None
    """Nearest-rank 99th percentile of the ok ops' latency (call to return); None if no op."""

    @property
    def ops_per_s(self) -> float:
        return self.ok / ((self.end_ns - self.start_ns) / 1e9)


def throughput_bins(ops: Sequence[Any], scale: _Scale) -> list[Bin]:
    """The run cut into about CHART_BINS equal slices of a 1-2-5 number of seconds.

    An op counts in the slice where it returned: that is when its client got the answer, so a
    fault shows as slices with few or no ok ops, and slow answers as a high p99 right after.
    """
    step_ns = max(int(_tick_step(scale.span_ns / 1e9, CHART_BINS) * 1e9), 1)
    count = max(math.ceil(scale.span_ns / step_ns), 1)
    latencies: list[list[int]] = [[] for _ in range(count)]
    for op in ops:
        returned = _get(op, "return_ns")
        if _get(op, "status") != "ok" or returned is None:
            continue
        slot = min(max((returned - scale.t0_ns) // step_ns, 0), count - 1)
        latencies[slot].append(returned - _get(op, "call_ns"))
    bins = []
    for i, found in enumerate(latencies):
        p99 = None
        if found:
            found.sort()
            p99 = found[max(math.ceil(0.99 * len(found)) - 1, 0)] / 1e6
        start = scale.t0_ns + i * step_ns
        bins.append(Bin(start, start + step_ns, len(found), p99))
    return bins


def _nice_ceiling(value: float) -> float:
    """The smallest 1-2-5 number at or above ``value`` (an axis maximum)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value)


def _chart_section(ops: Sequence[Any], faults: Sequence[Any], scale: _Scale) -> str:
    bins = throughput_bins(ops, scale)
    width_s = (bins[0].end_ns - bins[0].start_ns) / 1e9
    note = (
        f"Ok ops per second (bars, left axis) and the p99 latency of those ops (line, right "
        f"axis), in slices of {width_s:g} s, by when each op returned; faults are the same bands "
        "as above. A slice without a bar is time in which no client got an ok answer."
    )
    return (
        f'<h2>Availability</h2>\n<p class="note">{_esc(note)}</p>\n'
        + _chart_svg(bins, faults, scale)
    )


def _chart_svg(bins: Sequence[Bin], faults: Sequence[Any], scale: _Scale) -> str:
    width = PLOT_LEFT + PLOT_WIDTH + PLOT_RIGHT
    top, bottom = CHART_TOP, CHART_TOP + CHART_HEIGHT
    height = bottom + AXIS_HEIGHT
    rate_max = _nice_ceiling(max((b.ops_per_s for b in bins), default=0.0))
    p99_max = _nice_ceiling(max((b.p99_ms or 0.0 for b in bins), default=0.0))

    def y(value: float, top_value: float) -> float:
        return bottom - min(value / top_value, 1.0) * CHART_HEIGHT

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="throughput" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="system-ui, sans-serif" font-size="11">\n',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>\n',
        '<g class="legend">'
        f'<rect x="{PLOT_LEFT}" y="8" width="16" height="10" fill="{STATUS_COLOURS["ok"]}"/>'
        f'<text x="{PLOT_LEFT + 21}" y="17">ok ops per second (left axis)</text>'
        f'<line x1="{PLOT_LEFT + 230}" y1="13" x2="{PLOT_LEFT + 246}" y2="13" '
        f'stroke="{P99_COLOUR}" stroke-width="2"/>'
        f'<text x="{PLOT_LEFT + 251}" y="17">p99 latency of the ok ops, ms (right axis)</text>'
        "</g>\n",
    ]
    parts.append('<g class="chart-axes">\n')
    for k in range(5):  # horizontal grid with both axes' values
        fraction = k / 4
        gy = bottom - fraction * CHART_HEIGHT
        parts.append(
            f'<line x1="{PLOT_LEFT}" y1="{gy:.1f}" x2="{PLOT_LEFT + PLOT_WIDTH}" y2="{gy:.1f}" '
            'stroke="#000" stroke-opacity="0.08"/>'
            f'<text x="{PLOT_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end" fill="#444">'
            f"{rate_max * fraction:g}</text>"
            f'<text x="{PLOT_LEFT + PLOT_WIDTH + 6}" y="{gy + 4:.1f}" fill="{P99_COLOUR}">'
            f"{p99_max * fraction:g}</text>\n"
        )
    parts.append("</g>\n")
    parts.append('<g class="faults">\n')
    for fault in faults:
        kind, start, end = str(_get(fault, "kind")), _get(fault, "start_ns"), _get(fault, "end_ns")
        colour = FAULT_COLOURS.get(kind, OTHER_FAULT_COLOUR)
        x0 = scale.x(start)
        x1 = max(scale.x(end if end is not None else scale.end_ns), x0 + 2)
        parts.append(
            f'<rect class="band {_esc(kind)}" x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" '
            f'height="{CHART_HEIGHT}" fill="{colour}" fill-opacity="0.15" pointer-events="none"/>\n'
        )
    parts.append("</g>\n")
    parts.append('<g class="rate">\n')
    for b in bins:
        x0, x1 = scale.x(b.start_ns), scale.x(b.end_ns)
        by = y(b.ops_per_s, rate_max)
        p99 = "no ok op" if b.p99_ms is None else f"p99 {b.p99_ms:.1f} ms"
        title = (f"{_secs(scale.seconds(b.start_ns))}–{_secs(scale.seconds(b.end_ns))} s: "
                 f"{b.ok} ok ops ({b.ops_per_s:g}/s), {p99}")
        parts.append(
            f'<rect class="bin" data-ok="{b.ok}" x="{x0:.1f}" y="{by:.1f}" '
            f'width="{max(x1 - x0 - BAR_GAP_PX, MIN_BAR_PX):.1f}" height="{bottom - by:.1f}" '
            f'fill="{STATUS_COLOURS["ok"]}" fill-opacity="0.75"><title>{_esc(title)}</title>'
            "</rect>\n"
        )
    parts.append("</g>\n")
    segments: list[list[str]] = [[]]
    for b in bins:  # the p99 line breaks where a slice had no ok op
        if b.p99_ms is None:
            segments.append([])
            continue
        mid = (scale.x(b.start_ns) + scale.x(b.end_ns)) / 2
        segments[-1].append(f"{mid:.1f},{y(b.p99_ms, p99_max):.1f}")
    parts.append('<g class="p99">\n')
    for points in segments:
        if len(points) == 1:
            cx, cy = points[0].split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{P99_COLOUR}"/>\n')
        elif points:
            parts.append(f'<polyline points="{" ".join(points)}" fill="none" '
                         f'stroke="{P99_COLOUR}" stroke-width="1.6"/>\n')
    parts.append("</g>\n")
    parts.append(_time_axis(top, bottom, scale))
    parts.append("</svg>\n")
    return "".join(parts)


# --- tables --------------------------------------------------------------------------------


def _summary_cell(key: str, value: Any) -> str:
    """A summary value; a verdict (or validity) is coloured by whether the run passed."""
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = ", ".join(str(v) for v in value) or "none"
    else:
        text = str(value)
    css = ""
    if key.lower() in ("verdict", "valid"):
        word = text.strip().lower()
        if word in ("ok", "pass", "passed", "valid", "true", "linearizable"):
            css = ' class="good"'
        elif word:
            css = ' class="bad"'
    return f"<td{css}>{_esc(text)}</td>"


def _summary_label(key: str, labels: Mapping[str, str]) -> str:
    """The key in words: its label, else the raw name with spaces (``ops_ok`` -> ``ops ok``)."""
    if key in labels:
        return labels[key]
    words = key.replace("_", " ")
    return words[:1].upper() + words[1:]


def _summary_table(summary: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    rows = "".join(
        f"<tr><th>{_esc(_summary_label(str(key), labels))}</th>"
        f"{_summary_cell(str(key), value)}</tr>\n"
        for key, value in summary.items()
    )
    return f'<table class="summary">\n{rows}</table>\n' if rows else ""


OP_COLUMNS = ("op", "process", "kind", "key", "value", "status", "result", "call (s)", "return (s)")


def _op_row(op: Any, scale: _Scale) -> str:
    returned = _get(op, "return_ns")
    cells = [
        f'<td class="num">{_esc(_get(op, "index"))}</td>',
        f'<td class="num">{_esc(_get(op, "process"))}</td>',
        f"<td>{_esc(_get(op, 'kind'))}</td>",
        f"<td class=\"val\">{_esc(_get(op, 'key'))}</td>",
        f'<td class="val">{_esc(_show(_get(op, "value"), DETAIL_CHARS))}</td>',
        f"<td>{_esc(_get(op, 'status'))}</td>",
        f'<td class="val">{_esc(_show(_get(op, "result"), DETAIL_CHARS))}</td>',
        f'<td class="num">{_secs(scale.seconds(_get(op, "call_ns")))}</td>',
        f'<td class="num">{"—" if returned is None else _secs(scale.seconds(returned))}</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>\n"


def _violations_section(violations: Sequence[Any], ops: Iterable[Any], scale: _Scale) -> str:
    """Each violation with its message and a table of the ops it names, in the order named."""
    if not violations:
        return '<h2>Violations</h2>\n<p class="good">None found.</p>\n'
    by_index = {_get(op, "index"): op for op in ops}
    header = "<tr>" + "".join(f"<th>{c}</th>" for c in OP_COLUMNS) + "</tr>\n"
    items = []
    for number, violation in enumerate(violations, 1):
        rows = []
        for index in _get(violation, "ops") or ():
            op = by_index.get(index)
            if op is None:
                rows.append(
                    f'<tr><td class="num">{_esc(index)}</td>'
                    f'<td colspan="{len(OP_COLUMNS) - 1}">not in the history</td></tr>\n'
                )
            else:
                rows.append(_op_row(op, scale))
        items.append(
            f'<li id="violation-{number}"><p><strong class="bad">{_esc(_get(violation, "kind"))}'
            f"</strong> on key <code>{_esc(_get(violation, 'key'))}</code>: "
            f"{_esc(_get(violation, 'message'))}</p>\n"
            f'<table class="ops">\n{header}{"".join(rows)}</table></li>\n'
        )
    return (
        f'<h2>Violations ({len(violations)})</h2>\n<ol class="violations">\n'
        f"{''.join(items)}</ol>\n"
    )


def _faults_section(faults: Sequence[Any], scale: _Scale) -> str:
    if not faults:
        return '<h2>Faults</h2>\n<p class="note">None injected.</p>\n'
    rows = []
    for fault in sorted(faults, key=lambda f: _get(f, "start_ns")):
        start, end = _get(fault, "start_ns"), _get(fault, "end_ns")
        until = "not healed" if end is None else _secs(scale.seconds(end))
        lasted = "—" if end is None else _secs((end - start) / 1e9)
        rows.append(
            f"<tr><td>{_esc(_get(fault, 'kind'))}</td>"
            f'<td class="val">{_esc(_get(fault, "target"))}</td>'
            f'<td class="num">{_secs(scale.seconds(start))}</td><td class="num">{until}</td>'
            f'<td class="num">{lasted}</td></tr>\n'
        )
    return (
        f"<h2>Faults ({len(faults)})</h2>\n<table class=\"faults\">\n<tr><th>kind</th>"
        "<th>target</th><th>start (s)</th><th>end (s)</th><th>lasted (s)</th></tr>\n"
        f"{''.join(rows)}</table>\n"
    )
