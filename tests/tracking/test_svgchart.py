"""The report's inline SVG line charts: ticks, coordinates, gaps, levels, escaping."""

import math
import re
import xml.etree.ElementTree as ET

import pytest

from medfed.tracking.svgchart import LEFT, PANEL_H, PANEL_W, TOP, BOTTOM, RIGHT, Panel, Series, line_chart, nice_ticks

NS = "{http://www.w3.org/2000/svg}"


def _points(svg: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    return [[tuple(map(float, p.split(","))) for p in line.get("points").split()]
            for line in root.iter(f"{NS}polyline")]


@pytest.mark.parametrize("lo,hi,integer,expected", [
    (0.0, 1.0, False, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (1.0, 20.0, True, [5.0, 10.0, 15.0, 20.0]),
    (1.0, 3.0, True, [1.0, 2.0, 3.0]),
    (0.71, 0.74, False, [0.71, 0.715, 0.72, 0.725, 0.73, 0.735, 0.74]),
])
def test_ticks_are_round_and_cover_the_range(lo, hi, integer, expected):
    ticks = nice_ticks(lo, hi, 7 if not integer else 6, integer=integer)
    assert ticks == pytest.approx(expected)


def test_ticks_refuse_a_range_that_is_not_finite():
    with pytest.raises(ValueError, match="finite"):
        nice_ticks(0.0, math.inf)


def test_points_map_onto_the_plot_area_and_gaps_break_the_line():
    s = Series([1, 2, 3, 4, 5], [0.0, 1.0, None, 0.5, float("nan")], "#123456")
    svg = line_chart([Panel([s])])
    lines = _points(svg)
    assert len(lines) == 1  # 1-2 is a line; 4 alone is a marker, the missing values break it
    (x1, y1), (x2, y2) = lines[0]
    w, h = PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM
    # the x axis spans the rounds with a value, 1..4
    assert x1 == pytest.approx(LEFT, abs=0.1) and x2 == pytest.approx(LEFT + w / 3, abs=0.1)
    assert y2 < y1  # the larger value is higher on the page
    span = 1.0 / (h / 1.1)  # 5% padding each side of [0, 1]
    assert (y1 - y2) * span == pytest.approx(1.0, abs=0.01)
    root = ET.fromstring(svg)
    assert len(list(root.iter(f"{NS}circle"))) == 1  # the lone value at round 4


def test_a_level_spans_the_panel_and_panels_share_the_x_range():
    a = Panel([Series([1, 2, 3], [0.2, 0.4, 0.3], "red", "--", "local", markers=True)], title="north")
    b = Panel([Series([1, 10], [0.5, 0.6], "blue", label="federated"),
               Series([10], [0.55], "grey", ":", "zero_filled", level=True)], title="south")
    svg = line_chart([a, b], ncols=2, legend=[a.series[0], b.series[0]])
    first, second = _points(svg)
    assert first[0][0] == pytest.approx(LEFT, abs=0.1)
    assert second[-1][0] == pytest.approx(PANEL_W + PANEL_W - RIGHT, abs=0.1)  # round 10 ends both axes
    assert first[-1][0] < PANEL_W / 2  # round 3 of 1..10 sits left in its panel
    root = ET.fromstring(svg)
    dashed = [ln for ln in root.iter(f"{NS}line") if ln.get("stroke") == "grey"]
    assert len(dashed) == 1 and float(dashed[0].get("x2")) - float(dashed[0].get("x1")) == PANEL_W - LEFT - RIGHT
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "north" in texts and "south" in texts and "local" in texts and "federated" in texts


def test_text_is_escaped_and_the_svg_is_well_formed():
    svg = line_chart([Panel([Series([1, 2], [1, 2], "black", label="<b>&x")], title="<script>")],
                     legend=[Series((), (), "black", label="<b>&x")], description="a < b")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&lt;b&gt;&amp;x" in svg
    ET.fromstring(svg)
    assert re.match(r'<svg class="figure"', svg)


def test_an_empty_panel_still_draws_axes_and_no_panel_is_an_error():
    svg = line_chart([Panel([Series([1, 2], [None, None], "black")])])
    assert _points(svg) == [] and "<rect" in svg
    with pytest.raises(ValueError, match="at least one panel"):
        line_chart([])
