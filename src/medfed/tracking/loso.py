"""Leave-one-site-out results as a table and a figure: for every training site, the
monitored metric on its test split at each arm's last round when it trains (the full run)
and when it is held out (the run that leaves it out), read from the runs' metrics.jsonl.

A held-out site never trains, so it has no model of its own in the ``local``,
``finetuned`` and ``personalized`` arms: its unseen value there is None (the run records
nothing for it), and the figure draws only the arms where an unseen value exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from medfed.core.types import lower_is_better
from medfed.tracking.metrics import MODEL_ARMS, arms_present, comparison_rows, read_metrics
from medfed.tracking.tables import MISSING, fmt

OWN_MODEL_ARMS = ("local", "finetuned", "personalized")  # a held-out site has no model of its own in these
SPLIT = "test"


def _final(run_dir: Path, monitor: str) -> dict[str, dict[str, float | None]]:
    """site -> arm -> the monitored test metric at the arm's last round."""
    return {r["site"]: {a: r[a] for a in MODEL_ARMS} for r in comparison_rows(read_metrics(run_dir / "metrics.jsonl"),
                                                                             monitor, SPLIT)}


def loso_table(
    full_run: Path, left_out: dict[str, Path], monitor: str, job_name: str = "", full_label: str | None = None
) -> dict[str, Any]:
    """The table as data: ``full_run`` is the run where every site trains (recorded as
    ``full_label``, default its folder name), ``left_out`` maps each site to the run that
    held it out (recorded by folder name). Per site and arm: ``seen`` (the site
    trains), ``unseen`` (held out) and ``change`` (unseen - seen, None if either is)."""
    seen_all = _final(full_run, monitor)
    present = set(arms_present(read_metrics(full_run / "metrics.jsonl")))
    arms = [a for a in MODEL_ARMS if a in present or a == "federated"]
    rows = []
    for site, run in left_out.items():
        seen = seen_all.get(site, {})
        unseen = _final(run, monitor).get(site, {})
        row: dict[str, Any] = {"site": site, "run": str(run.name)}
        for arm in arms:
            s, u = seen.get(arm), unseen.get(arm)
            row[arm] = {"seen": s, "unseen": u, "change": u - s if s is not None and u is not None else None}
        rows.append(row)
    means = {}
    for arm in arms:  # the mean over sites, each counting once, of what is defined
        col = {k: [r[arm][k] for r in rows if r[arm][k] is not None] for k in ("seen", "unseen", "change")}
        means[arm] = {k: (sum(v) / len(v) if v else None) for k, v in col.items()}
    missing = [a for a in arms if a in OWN_MODEL_ARMS]
    note = (f"{', '.join(missing)}: a held-out site never trains, so it has no model of its own in "
            f"{'this arm' if len(missing) == 1 else 'these arms'} (no unseen value)")
    return {"job": job_name, "metric": monitor, "split": SPLIT, "lower_is_better": lower_is_better(monitor),
            "full_run": full_label if full_label is not None else full_run.name, "arms": arms, "sites": rows,
            "mean": means, "notes": [note] if missing else []}


def write_json(table: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(table, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _cells(cell: dict[str, float | None]) -> list[str]:
    return [fmt(cell["seen"]), fmt(cell["unseen"]), fmt(cell["change"], signed=True)]


def markdown(table: dict[str, Any]) -> str:
    """loso.md: one row per site, seen / unseen / change for every arm, then the mean."""
    arms = table["arms"]
    head = ["site"] + [f"{a} {k}" for a in arms for k in ("seen", "unseen", "change")]
    lines = [f"# Leave one site out: {table['job']}", "",
             (f"{table['metric']} on the {table['split']} split at each arm's last round: *seen* when the site "
              "trains (the full run), *unseen* when it is held out (the run that leaves it out)."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["sites"]:
        lines.append("| " + " | ".join([r["site"], *(c for a in arms for c in _cells(r[a]))]) + " |")
    lines.append("| mean | " + " | ".join(c for a in arms for c in _cells(table["mean"][a])) + " |")
    lines += [""] + [f"- {n}" for n in table["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def rich_table(table: dict[str, Any]) -> Table:
    t = Table(title=f"leave one site out: {table['metric']} on {table['split']} (seen → unseen)")
    t.add_column("site")
    for a in table["arms"]:
        t.add_column(a, justify="right")
    for r in [*table["sites"], {"site": "mean", **table["mean"]}]:
        t.add_row(r["site"], *(f"{fmt(r[a]['seen'])} → {fmt(r[a]['unseen'])} ({fmt(r[a]['change'], signed=True)})"
                               if r[a]["unseen"] is not None else f"{fmt(r[a]['seen'])} → {MISSING}"
                               for a in table["arms"]))
    return t


def figure(table: dict[str, Any], path: Path) -> None:
    """loso.png: one panel per arm that has an unseen value, grouped bars per site
    (seen, unseen); an undefined value is left as a gap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = [a for a in table["arms"] if any(r[a]["unseen"] is not None for r in table["sites"])] or ["federated"]
    sites = [r["site"] for r in table["sites"]]
    fig = Figure(figsize=(max(4.0, 1.0 + 0.8 * len(sites)) * len(arms), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(arms), squeeze=False)[0]
    x = list(range(len(sites)))
    for ax, arm in zip(axes, arms):
        for k, (key, colour) in enumerate((("seen", "tab:blue"), ("unseen", "tab:orange"))):
            values = [math.nan if r[arm][key] is None else r[arm][key] for r in table["sites"]]
            ax.bar([i + (k - 0.5) * 0.38 for i in x], values, width=0.38, color=colour,
                   label="site trains" if key == "seen" else "site held out")
        ax.set_xticks(x, sites, rotation=30 if len(sites) > 6 else 0)
        ax.set_title(arm)
        ax.set_ylabel(f"{table['metric']} ({table['split']})")
    axes[0].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90, metadata={"Software": None})
