"""The comparison of a run's arms as tables: each site's figure per arm at the last round,
the consortium rows (``all``, ``median``) and the spread across the training sites (worst
and best site, standard deviation, gap), as HTML for the report and as a rich table for
the terminal. Built from metrics.jsonl's records alone (tracking/metrics.py), so any
reader of a run folder shows the same figures.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Collection
from html import escape
from pathlib import Path

from rich.table import Table
from rich.text import Text

from medfed.core.types import lower_is_better
from medfed.tracking.metrics import ARMS, CONSORTIUM_SITES, Spread, arms_present, comparison_rows, spread_rows, spreads

MISSING = "–"  # en dash: a value that is absent or undefined


def fmt(value: float | None, signed: bool = False) -> str:
    """Three decimals, or an en dash where the value is absent, NaN or infinite."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:+.3f}" if signed else f"{value:.3f}"


Cell = str | tuple[str, str]  # plain text, or (text, title): the title shows on hover


def td(cell: Cell) -> str:
    if isinstance(cell, tuple):
        text, title = cell
        return f'<td title="{escape(title)}">{escape(text)}</td>'
    return f"<td>{escape(cell)}</td>"


def html_table(header: list[str], rows: list[list[Cell]], row_classes: list[str] | None = None) -> str:
    """An HTML table; every cell is escaped here, so callers pass plain text (or (text, title))."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{escape(row_classes[i])}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(td(c) for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------- HTML


def comparison_columns(records: list[dict]) -> tuple[list[str], bool]:
    """The arms to show (federated always) and whether to show the gain over local."""
    present = set(arms_present(records))
    arms = [a for a in ARMS if a in present or a == "federated"]
    return arms, "local" in arms


SPREAD_LABELS = {"worst": "worst site", "best": "best site", "std": "std across sites", "gap": "gap (best − worst)"}


def site_label(site: str, held_out: Collection[str]) -> str:
    """A site's name in a comparison table, marked when it is held out."""
    return f"{site} (held out)" if site in held_out else site


def spread_cell(row: dict, arm: str) -> str:
    """A spread row's value for ``arm``, with the site for worst and best: "0.590 (c)"."""
    where = row["where"].get(arm)
    return fmt(row[arm]) + (f" ({where})" if where is not None and row[arm] is not None else "")


def _spread_text(sp: Spread) -> str:
    """One arm's spread in words, for a sentence."""
    if sp.worst is None or sp.best is None:
        return "no site has a defined value"
    return (f"worst {sp.worst[0]} {fmt(sp.worst[1])}, best {sp.best[0]} {fmt(sp.best[1])}, "
            f"std {fmt(sp.std)}, gap {fmt(sp.gap)}")


def comparison_section(records: list[dict], monitor: str, best: dict | None, held_out: Collection[str] = ()) -> str:
    """The report's table of test ``monitor`` per site and arm at the last round, with the
    spread rows, and the best model (``model_best.json``'s content) with the spread at its
    round."""
    rows = comparison_rows(records, monitor)
    arms, gain = comparison_columns(records)
    header = ["site", *arms] + (["gain (federated − local)"] if gain else [])
    cells = [[site_label(r["site"], held_out), *(fmt(r[a]) for a in arms)] + ([fmt(r["gain"], signed=True)] if gain else [])
             for r in rows]
    classes = ["pooled" if r["site"] in CONSORTIUM_SITES else "" for r in rows]
    if rows:
        for r in spread_rows(records, monitor, held_out=held_out):
            cells.append([SPREAD_LABELS[r["site"]], *(spread_cell(r, a) for a in arms)]
                         + ([fmt(r["gain"], signed=True)] if gain else []))
            classes.append("spread")
    parts = [f"<h2>Test {escape(monitor)} at the last round</h2>"]
    parts.append(html_table(header, cells, classes) if rows else '<p class="note">No test metrics recorded.</p>')
    parts.append(f'<p class="note">Each arm at its last evaluated round; “all” is the mean over the training sites '
                 f'weighted by test examples, “median” their median (a figure no single site can move far). '
                 f'The spread across the training sites (held-out sites excluded, each site counting once): the '
                 f'worst and the best site, the standard deviation and the gap between best and worst; a smaller '
                 f'spread is fairer. {escape(MISSING)} = not run or undefined.</p>')
    undefined = [f"{arm}: {', '.join(sp.undefined)}" for arm, sp in spreads(records, monitor, held_out=held_out).items()
                 if sp.undefined and arm in arms]
    if undefined:
        parts.append(f'<p class="note">Left out of the spread, no defined value: {escape("; ".join(undefined))}.</p>')
    if best is not None:
        metric = str(best.get("metric", "val metric")).replace("_", " ")
        rnd = best.get("round")
        at_best = spreads(records, monitor, held_out=held_out, at_round=rnd).get("federated") if isinstance(rnd, int) else None
        across = f" Test {monitor} across the training sites at that round: {_spread_text(at_best)}." if at_best else ""
        parts.append(
            f"<p>Best model ({escape(str(best.get('arm', 'federated')))}, chosen on {escape(metric)}): "
            f"round {escape(str(rnd if rnd is not None else MISSING))}, {escape(metric)} "
            f"{escape(fmt(best.get('value')))}.{escape(across)}</p>"
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------- terminal


def summary_table(records: list[dict], monitor: str, held_out: Collection[str] = ()) -> Table:
    """The comparison of :func:`comparison_rows` as a rich table for the terminal, with
    the spread across the training sites (:func:`spread_rows`) below: worst and best site,
    standard deviation and gap. ``held_out`` sites are marked and left out of the spread.

    With the local arm present, every arm the federation trained (federated, personalized,
    finetuned) is followed by its gain: its value minus local's at that site, green where it
    beats the site training alone (for std and gap: where the spread is smaller), so that a
    failure and its fix read side by side.
    """
    arms, gain = comparison_columns(records)
    methods = [a for a in arms if a not in ("zero_filled", "local", "centralized")] if gain else []
    rows = comparison_rows(records, monitor)
    caption = "spread: across the training sites, each counting once" if rows else ""
    if methods:
        caption = f"gain: the {monitor} to its left minus local's" + (f"; {caption}" if caption else "")
    table = Table(title=f"test {monitor} at the last round", caption=caption or None)
    table.add_column("site")
    for arm in arms:
        table.add_column(arm, justify="right")
        if arm in methods:
            table.add_column("gain", justify="right")
    lower = lower_is_better(monitor)
    for r in rows:
        cells: list[str | Text] = []
        for arm in arms:
            cells.append(fmt(r[arm]))
            if arm in methods:
                cells.append(_gain_cell(r[arm], r["local"], lower))
        table.add_row(Text(site_label(r["site"], held_out)), *cells,
                      style="bold" if r["site"] in CONSORTIUM_SITES else None, end_section=r is rows[-1])
    for r in spread_rows(records, monitor, held_out=held_out) if rows else []:
        cells = []
        for arm in arms:
            cells.append(spread_cell(r, arm))
            if arm in methods:
                cells.append(_gain_cell(r[arm], r["local"], r["lower_is_better"]))
        table.add_row(Text(SPREAD_LABELS[r["site"]]), *cells, style="italic")
    return table


def _gain_cell(value: float | None, local: float | None, lower: bool) -> Text:
    """``value - local``, green where it is better (higher; lower where ``lower``: less is better)."""
    g = value - local if value is not None and local is not None else None
    better = -(g or 0) if lower else (g or 0)
    return Text(fmt(g, signed=True), style="green" if better > 0 else "red" if better < 0 else "")


def pictures_section(folder: Path, heading: str, note_html: str, limit: int, min_width: int) -> str:
    """A report section of the PNG pictures a run saved per site under ``folder``
    (``folder/<site>/*.png``), at most ``limit`` a site, inline; empty when there are none.
    ``note_html`` is written as it is (the caller escapes what it takes from elsewhere)."""
    if not folder.is_dir():
        return ""
    parts = [f"<h2>{escape(heading)}</h2>", f'<p class="note">{note_html}</p>']
    for site in sorted(p for p in folder.iterdir() if p.is_dir()):
        pngs = sorted(site.glob("*.png"))[:limit]
        if not pngs:
            continue
        parts.append(f"<h3>{escape(site.name)}</h3>")
        for png in pngs:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f'<figure style="display:inline-block;margin:0.3em"><img alt="{escape(png.name)}" '
                         f'src="data:image/png;base64,{data}" style="image-rendering:pixelated;min-width:{min_width}px">'
                         f'<figcaption class="note">{escape(png.stem)}</figcaption></figure>')
    return "\n".join(parts)

