"""``kv bench --plot FILE.svg``: throughput and p99 latency against client count, one line per
target, side by side, as a self-contained SVG (no plotting library: the same hand-written SVG as
``kvstore.check.report``'s charts, readable in any browser).

The x axis is logarithmic in the client count (1, 16, 64 spread evenly by their ratio), each
point is a median over the rounds, and etcd's ceiling with its own Go clients (``etcdctl check
perf``), when measured, is a dashed line across the throughput panel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

PANEL_WIDTH = 360
PANEL_HEIGHT = 240
MARGIN_LEFT = 64
MARGIN_RIGHT = 24
MARGIN_TOP = 44
MARGIN_BOTTOM = 52
GAP = 40
COLOURS = {"ours": "#1f77b4", "etcd": "#d62728", "ours-noop": "#2ca02c", "raw": "#9467bd",
           "ours-calls": "#ff7f0e", "ours-plaintext": "#8c564b"}
OTHER_COLOUR = "#7f7f7f"
CEILING_COLOUR = "#d62728"


def nice_ceiling(value: float) -> float:
    """The smallest 1-2-5 number at or above ``value`` (an axis maximum)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value)


def series(doc: dict[str, Any], field: str) -> dict[str, list[tuple[int, float]]]:
    """``{target: [(clients, median of field), ...]}`` in client order, from a bench report."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in doc["results"]:
        if row.get(field) is not None:
            out.setdefault(row["target"], []).append((int(row["clients"]), float(row[field])))
    return {name: sorted(points) for name, points in out.items()}


class _Axes:
    """One panel: maps (clients, value) to pixels."""

    def __init__(self, left: float, counts: Sequence[int], top_value: float) -> None:
        self.left = left
        self.low, self.high = math.log(min(counts)), math.log(max(counts))
        self.top_value = top_value

    def x(self, clients: int) -> float:
        if self.high == self.low:
            return self.left + PANEL_WIDTH / 2
        return self.left + (math.log(clients) - self.low) / (self.high - self.low) * PANEL_WIDTH

    def y(self, value: float) -> float:
        return MARGIN_TOP + PANEL_HEIGHT - min(value / self.top_value, 1.0) * PANEL_HEIGHT


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"


def _panel(axes: _Axes, title: str, unit: str, lines: dict[str, list[tuple[int, float]]],
           counts: Sequence[int], ceiling: float | None = None) -> list[str]:
    left, bottom = axes.left, MARGIN_TOP + PANEL_HEIGHT
    parts = [(f'<text x="{left + PANEL_WIDTH / 2}" y="{MARGIN_TOP - 12}" text-anchor="middle" '
              f'font-weight="bold">{escape(title)}</text>\n'),
             (f'<rect x="{left}" y="{MARGIN_TOP}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" '
              'fill="none" stroke="#999"/>\n')]
    for k in range(5):
        value = axes.top_value * k / 4
        gy = axes.y(value)
        parts.append(f'<line x1="{left}" y1="{gy:.1f}" x2="{left + PANEL_WIDTH}" y2="{gy:.1f}" '
                     'stroke="#000" stroke-opacity="0.08"/>'
                     f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end" fill="#444">'
                     f"{_fmt(value)}</text>\n")
    for clients in counts:
        gx = axes.x(clients)
        parts.append(f'<line x1="{gx:.1f}" y1="{bottom}" x2="{gx:.1f}" y2="{bottom + 4}" '
                     f'stroke="#444"/><text x="{gx:.1f}" y="{bottom + 17}" text-anchor="middle" '
                     f'fill="#444">{clients}</text>\n')
    parts.append(f'<text x="{left + PANEL_WIDTH / 2}" y="{bottom + 36}" text-anchor="middle">'
                 f'clients (log scale)</text>\n'
                 f'<text x="{left - 48}" y="{MARGIN_TOP + PANEL_HEIGHT / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 {left - 48} {MARGIN_TOP + PANEL_HEIGHT / 2})">'
                 f"{escape(unit)}</text>\n")
    if ceiling is not None:
        cy = axes.y(ceiling)
        parts.append(f'<line class="ceiling" x1="{left}" y1="{cy:.1f}" x2="{left + PANEL_WIDTH}" '
                     f'y2="{cy:.1f}" stroke="{CEILING_COLOUR}" stroke-dasharray="6 4"/>'
                     f'<text x="{left + 4}" y="{cy - 4:.1f}" fill="{CEILING_COLOUR}">etcd ceiling '
                     f"(etcdctl check perf): {ceiling:,.0f}/s</text>\n")
    for name, points in lines.items():
        colour = COLOURS.get(name, OTHER_COLOUR)
        xy = [(axes.x(c), axes.y(v)) for c, v in points]
        if len(xy) > 1:
            joined = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            parts.append(f'<polyline class="series" data-target="{escape(name)}" '
                         f'points="{joined}" fill="none" stroke="{colour}" stroke-width="2"/>\n')
        for (c, v), (x, y) in zip(points, xy, strict=True):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                         f"<title>{escape(name)}, {c} clients: {_fmt(v)} {escape(unit)}</title>"
                         "</circle>\n")
    return parts


def render_svg(doc: dict[str, Any]) -> str:
    """The chart of a ``kv bench`` report document (``runner.run_bench``)."""
    rates, p99s = series(doc, "ops_s"), series(doc, "p99_ms")
    counts = sorted({c for points in rates.values() for c, _ in points}) or [1]
    ceiling_doc = doc.get("ceiling") or {}
    ceiling = ceiling_doc.get("ops_s")
    top_rate = nice_ceiling(max([v for pts in rates.values() for _, v in pts] + [ceiling or 0.0]))
    top_p99 = nice_ceiling(max([v for pts in p99s.values() for _, v in pts] + [0.0]))
    width = 2 * (MARGIN_LEFT + PANEL_WIDTH + MARGIN_RIGHT) + GAP
    height = MARGIN_TOP + PANEL_HEIGHT + MARGIN_BOTTOM + 24
    second = MARGIN_LEFT + PANEL_WIDTH + MARGIN_RIGHT + GAP + MARGIN_LEFT
    config = doc.get("config", {})
    caption = (f"kv bench: {config.get('workload', '')}, {config.get('value_size', '?')} B values, "
               f"medians of {config.get('rounds', '?')} round(s) of {config.get('duration', 0):g}s")
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="bench" width="{width}" '
              f'height="{height}" viewBox="0 0 {width} {height}" '
              'font-family="system-ui, sans-serif" font-size="11">\n'),
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>\n',
             f'<text x="{MARGIN_LEFT}" y="16">{escape(caption)}</text>\n']
    parts += _panel(_Axes(MARGIN_LEFT, counts, top_rate), "Throughput", "ops/s", rates, counts,
                    ceiling)
    parts += _panel(_Axes(second, counts, top_p99), "p99 latency", "ms", p99s, counts)
    legend_y = height - 8
    x = MARGIN_LEFT
    for name in rates:
        colour = COLOURS.get(name, OTHER_COLOUR)
        parts.append(f'<line x1="{x}" y1="{legend_y - 4}" x2="{x + 18}" y2="{legend_y - 4}" '
                     f'stroke="{colour}" stroke-width="2"/><text x="{x + 23}" y="{legend_y}">'
                     f"{escape(name)}</text>\n")
        x += 40 + 7 * len(name)
    parts.append("</svg>\n")
    return "".join(parts)


def write_svg(doc: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write(render_svg(doc))
