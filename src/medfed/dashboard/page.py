"""The dashboard's page, and the same charts for a static page (``report.html``).

Both are HTML with their script, styles and the charting library inlined from ``static/``
(uPlot, MIT, vendored: see ``static/VENDORED.md``). Nothing is fetched from another
server, so they work with no internet. The page polls the dashboard's server; the static
charts draw data embedded in the page (``<script type="application/json"
id="medfed-snapshot">``), which ``dashboard.js`` finds and draws once.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def _static(name: str) -> str:
    return resources.files("medfed.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def _inline(name: str) -> str:
    text = _static(name)
    if "</script" in text.lower() or "</style" in text.lower():  # would end the inline element early
        raise ValueError(f"static/{name} cannot be inlined: it holds a closing script or style tag")
    return text


def render_page(nonce: str) -> str:
    """The dashboard's page, its inline script and style elements marked with ``nonce`` (the
    response's content security policy allows those only)."""
    return (_static("dashboard.html")
            .replace("@NONCE@", nonce)
            .replace("@CHARTS@", _static("charts.html"))
            .replace("@STYLE@", _inline("uPlot.min.css") + "\n" + _inline("charts.css") + "\n"
                     + _inline("dashboard.css"))
            .replace("@LIBRARY@", _inline("uPlot.iife.min.js"))
            .replace("@SCRIPT@", _inline("dashboard.js")))


def static_charts(charts: dict[str, Any]) -> str:
    """The interactive charts (learning curves, epsilon, bytes per round) as an HTML fragment
    for a self-contained page; ``charts`` holds the snapshot's ``curves``, ``privacy`` and
    ``bytes`` (:func:`medfed.dashboard.snapshot.charts`). Headings are h3."""
    data = json.dumps({k: charts.get(k) for k in ("curves", "privacy", "bytes")}, allow_nan=False)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert inside <script>
    fragment = _static("charts.html").replace("<h2>", "<h3>").replace("</h2>", "</h3>")
    return (f"<style>{_inline('uPlot.min.css')}\n{_inline('charts.css')}</style>\n{fragment}"
            f'<script type="application/json" id="medfed-snapshot">{data}</script>\n'
            f"<script>{_inline('uPlot.iife.min.js')}</script>\n<script>{_inline('dashboard.js')}</script>\n")
