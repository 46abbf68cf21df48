"""Line charts as inline SVG, for the report's learning curves and training loss.

A run's report draws a few panels of lines against the round. Written as SVG text they
need no plotting library: importing and rendering with matplotlib took about half a
second of every ``medfed run`` (benchmarks/RESULTS.md), more than the rest of the report.
The SVG is part of the HTML (no file, no script, nothing fetched) and stays sharp when the
page is zoomed or printed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# matplotlib's line styles, as SVG dash patterns (pixels)
DASHES = {"-": "", "--": "5,3", ":": "1.5,2.5", "-.": "6,2.5,1.5,2.5"}
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf")  # colours of lines given none
PANEL_W, PANEL_H = 256, 184  # pixels of one panel, axes and labels included
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 20, 30  # the plot area's margins inside a panel
LEGEND_H = 22
FONT = 'font-family="system-ui, sans-serif"'


@dataclass(frozen=True)
class Series:
    """One line: ``ys[i]`` at ``xs[i]``; a missing or non-finite value breaks the line.
    ``dash`` is one of :data:`DASHES`; ``level`` draws ``ys[0]`` across the whole panel."""

    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str
    dash: str = "-"
    label: str | None = None
    width: float = 1.2
    markers: bool = False
    level: bool = False


@dataclass(frozen=True)
class Panel:
    series: Sequence[Series]
    title: str = ""
    ylabel: str = ""


def nice_ticks(lo: float, hi: float, most: int = 6, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten, at
    most ``most`` of them (whole numbers only when ``integer``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"ticks need a finite range, got [{lo}, {hi}]")
    span = hi - lo
    if span == 0:
        return [lo]
    raw = span / max(1, most - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, math.ceil(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    digits = max(0, -math.floor(math.log10(step))) if step > 0 and step < 1 else 0
    return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad


def _panel(p: Panel, x0: float, y0: float, panel_w: int, xr: tuple[float, float], xticks: list[float],
           xlabel: str, show_x: bool) -> list[str]:
    """SVG elements of one panel ``panel_w`` pixels wide whose top-left corner is (x0, y0)."""
    ax, ay = x0 + LEFT, y0 + TOP
    w, h = panel_w - LEFT - RIGHT, PANEL_H - TOP - BOTTOM
    lo, hi = _range([float(v) for s in p.series for v in s.ys if _finite(v)])
    yticks = [t for t in nice_ticks(lo, hi, 5) if lo <= t <= hi]
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    xspan = xr[1] - xr[0] or 1.0

    def px(x: float) -> float:
        return ax + (x - xr[0]) / xspan * w

    def py(y: float) -> float:
        return ay + h - (y - lo) / (hi - lo) * h

    out = [f'<rect x="{ax:.1f}" y="{ay:.1f}" width="{w}" height="{h}" fill="white" stroke="#444" stroke-width="0.8"/>']
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{ax:.1f}" y1="{y:.1f}" x2="{ax + w:.1f}" y2="{y:.1f}" stroke="#ddd" stroke-width="0.6"/>')
        out.append(f'<text x="{ax - 4:.1f}" y="{y + 3:.1f}" font-size="9" text-anchor="end">{_label(t, ystep)}</text>')
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{ay:.1f}" x2="{x:.1f}" y2="{ay + h:.1f}" stroke="#eee" stroke-width="0.6"/>')
        if show_x:
            out.append(f'<text x="{x:.1f}" y="{ay + h + 12:.1f}" font-size="9" text-anchor="middle">{_label(t, 1)}</text>')
    if show_x and xlabel:
        out.append(f'<text x="{ax + w / 2:.1f}" y="{ay + h + 25:.1f}" font-size="10" text-anchor="middle">'
                   f'{escape(xlabel)}</text>')
    if p.title:
        out.append(f'<text x="{ax + w / 2:.1f}" y="{y0 + 13:.1f}" font-size="10" text-anchor="middle">'
                   f'{escape(p.title)}</text>')
    if p.ylabel:
        out.append(f'<text transform="translate({x0 + 10:.1f},{ay + h / 2:.1f}) rotate(-90)" font-size="10" '
                   f'text-anchor="middle">{escape(p.ylabel)}</text>')
    for s in p.series:
        style = f'stroke="{escape(s.color)}" stroke-width="{s.width:g}" fill="none"'
        if DASHES[s.dash]:
            style += f' stroke-dasharray="{DASHES[s.dash]}"'
        if s.level:
            if _finite(s.ys[0]):
                y = py(float(s.ys[0]))  # type: ignore[arg-type]
                out.append(f'<line x1="{ax:.1f}" y1="{y:.1f}" x2="{ax + w:.1f}" y2="{y:.1f}" {style}/>')
            continue
        runs: list[list[tuple[float, float]]] = [[]]  # the stretches of finite values
        for x, y in zip(s.xs, s.ys):
            if _finite(y):
                runs[-1].append((px(float(x)), py(float(y))))  # type: ignore[arg-type]
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) > 1:
                out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in run)}" {style}/>')
            if s.markers or len(run) == 1:  # a lone value would not show as a line
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{escape(s.color)}"/>' for x, y in run]
    return out


def _legend(entries: Sequence[Series], width: float) -> list[str]:
    slot = min(130.0, width / max(1, len(entries)))
    x = (width - slot * len(entries)) / 2
    out = []
    for s in entries:
        dash = f' stroke-dasharray="{DASHES[s.dash]}"' if DASHES[s.dash] else ""
        out.append(f'<line x1="{x + 4:.1f}" y1="11" x2="{x + 26:.1f}" y2="11" stroke="{escape(s.color)}" '
                   f'stroke-width="1.5"{dash}/>')
        out.append(f'<text x="{x + 30:.1f}" y="14" font-size="10">{escape(s.label or "")}</text>')
        x += slot
    return out


def line_chart(panels: Sequence[Panel], ncols: int = 1, xlabel: str = "round", legend: Sequence[Series] = (),
               scale: float = 1.0, description: str = "figure") -> str:
    """An ``<svg>`` element of ``panels`` in rows of ``ncols``, sharing one x range (whole
    numbers: rounds), each with its own y range; ``legend``: the entries (label, colour,
    dash) drawn above the panels; ``scale`` widens every panel (a single wide chart)."""
    if not panels:
        raise ValueError("a chart needs at least one panel")
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    xs = [float(x) for p in panels for s in p.series if not s.level for x, y in zip(s.xs, s.ys) if _finite(y)]
    xr = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if xr[0] == xr[1]:
        xr = (xr[0] - 1, xr[1] + 1)
    xticks = [t for t in nice_ticks(xr[0], xr[1], 6, integer=True) if xr[0] <= t <= xr[1]]
    top = LEGEND_H if legend else 0
    panel_w = int(PANEL_W * scale)
    width, height = ncols * panel_w, top + nrows * PANEL_H
    body = _legend(legend, width)
    for i, p in enumerate(panels):
        row, col = divmod(i, ncols)
        below = i + ncols >= len(panels)  # the lowest panel of its column carries the x axis labels
        body += _panel(p, col * panel_w, top + row * PANEL_H, panel_w, xr, xticks, xlabel, below)
    return (f'<svg class="figure" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" {FONT}><title>{escape(description)}</title>'
            + "".join(body) + "</svg>")
