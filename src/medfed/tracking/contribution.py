"""``contribution.json``: each training site's contribution to the global model's metric
(server/contribution.py computes it), its terminal table and its report section.

The file, written once at the end of the federated arm::

    {"method": "shapley", "metric": "auc", "split": "val", "rounds": "all",
     "gain": 0.21,                           # sum over rounds of utility(all) - utility(none)
     "sites": [{"site": "a", "shapley": 0.12, "ci95": [0.10, 0.14] or null, "loo": 0.05,
                "rounds": 3}, ...],           # job order; shapley null with method loo
     "per_round": [{"round": 1, "sites": ["a", "b"], "estimator": "exact", "evaluations": 4,
                    "utility_start": 0.5, "utility_all": 0.62, "shapley": [...] or null,
                    "halfwidths": [...] or null, "loo": [...]}, ...],
     "skipped": [{"round": 2, "reason": "..."}]}

Utilities are in the metric's units, negated for a figure where less is better (loss), so
that a positive contribution always helps.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.core.errors import RunDirError
from medfed.core.files import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.table import Table

CONTRIBUTION_FILE = "contribution.json"


class Estimator(str, enum.Enum):
    """How a round's figures were found."""

    EXACT = "exact"  # Shapley values from every subset of the round's sites
    SAMPLED = "sampled"  # Shapley values from random orders of the sites, with 95% intervals
    LOO = "loo"  # leave-one-out only


@dataclass(frozen=True)
class RoundContribution:
    """One round: the sites whose updates were used (job order), their figures in that
    order, and the utilities of no update (the round's start model) and of all of them."""

    round: int
    sites: tuple[str, ...]
    estimator: Estimator
    evaluations: int
    utility_start: float
    utility_all: float
    loo: tuple[float, ...]
    shapley: tuple[float, ...] | None = None
    halfwidths: tuple[float, ...] | None = None  # 95% half-widths of sampled values


@dataclass(frozen=True)
class SiteContribution:
    """One site's figures summed over the rounds counted; ``ci95`` when some round was
    sampled (half-widths combined as independent errors)."""

    site: str
    shapley: float | None
    ci95: tuple[float, float] | None
    loo: float
    rounds: int


@dataclass(frozen=True)
class Contribution:
    method: str  # "shapley" | "loo"
    metric: str
    split: str
    rounds: str  # "all" | "last"
    sites: tuple[SiteContribution, ...]
    per_round: tuple[RoundContribution, ...]
    skipped: tuple[tuple[int, str], ...] = ()

    @property
    def gain(self) -> float:
        """The sum over the rounds counted of ``utility(all) - utility(none)``: what the
        Shapley values add up to (efficiency)."""
        return sum(r.utility_all - r.utility_start for r in self.per_round)


def summarize(method: str, metric: str, split: str, rounds: str, site_names: Sequence[str],
              per_round: Sequence[RoundContribution], skipped: Sequence[tuple[int, str]] = ()) -> Contribution:
    """The per-site sums of ``per_round`` for every site of ``site_names`` (a site that
    never took part: 0 in 0 rounds)."""
    shapley = {s: 0.0 for s in site_names}
    var = {s: 0.0 for s in site_names}
    loo = {s: 0.0 for s in site_names}
    count = {s: 0 for s in site_names}
    for r in per_round:
        for k, s in enumerate(r.sites):
            loo[s] += r.loo[k]
            count[s] += 1
            if r.shapley is not None:
                shapley[s] += r.shapley[k]
            if r.halfwidths is not None:
                var[s] += r.halfwidths[k] ** 2
    sampled = any(r.halfwidths is not None for r in per_round)
    sites = []
    for s in site_names:
        value = shapley[s] if method == "shapley" else None
        h = math.sqrt(var[s])
        ci = (value - h, value + h) if sampled and value is not None else None
        sites.append(SiteContribution(s, value, ci, loo[s], count[s]))
    return Contribution(method, metric, split, rounds, tuple(sites), tuple(per_round), tuple(skipped))


# --------------------------------------------------------------------------- the file


def to_json(c: Contribution) -> dict[str, Any]:
    return {
        "method": c.method, "metric": c.metric, "split": c.split, "rounds": c.rounds, "gain": c.gain,
        "sites": [{"site": s.site, "shapley": s.shapley, "ci95": list(s.ci95) if s.ci95 else None, "loo": s.loo,
                   "rounds": s.rounds} for s in c.sites],
        "per_round": [{"round": r.round, "sites": list(r.sites), "estimator": r.estimator.value,
                       "evaluations": r.evaluations, "utility_start": r.utility_start, "utility_all": r.utility_all,
                       "shapley": _list(r.shapley), "halfwidths": _list(r.halfwidths), "loo": list(r.loo)}
                      for r in c.per_round],
        "skipped": [{"round": rnd, "reason": why} for rnd, why in c.skipped],
    }


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return list(values) if values is not None else None


def _tuple(values: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None else None


def from_json(obj: dict[str, Any]) -> Contribution:
    """The :class:`Contribution` of a parsed file; KeyError, TypeError or ValueError when
    it is not one."""
    sites = tuple(
        SiteContribution(str(s["site"]), None if s["shapley"] is None else float(s["shapley"]),
                         None if s["ci95"] is None else (float(s["ci95"][0]), float(s["ci95"][1])),
                         float(s["loo"]), int(s["rounds"]))
        for s in obj["sites"]
    )
    per_round = tuple(
        RoundContribution(int(r["round"]), tuple(str(s) for s in r["sites"]), Estimator(r["estimator"]),
                          int(r["evaluations"]), float(r["utility_start"]), float(r["utility_all"]),
                          _tuple(r["loo"]) or (), _tuple(r["shapley"]), _tuple(r["halfwidths"]))
        for r in obj["per_round"]
    )
    skipped = tuple((int(s["round"]), str(s["reason"])) for s in obj.get("skipped", []))
    return Contribution(str(obj["method"]), str(obj["metric"]), str(obj["split"]), str(obj["rounds"]), sites,
                        per_round, skipped)


def write_contribution(folder: Path, c: Contribution) -> Path:
    path = Path(folder) / CONTRIBUTION_FILE
    atomic_write_text(path, json.dumps(to_json(c), indent=2) + "\n")
    return path


def read_contribution(run_dir: Path) -> Contribution | None:
    """The run's contribution figures, or None when the run has none. A malformed file is
    a RunDirError naming it."""
    path = Path(run_dir) / CONTRIBUTION_FILE
    if not path.is_file():
        return None
    try:
        return from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise RunDirError(f"'{path}' is not a contribution file medfed wrote ({type(e).__name__}: {e}); "
                          f"remove it or run the job again") from None


# --------------------------------------------------------------------------- showing it


def _what(c: Contribution) -> str:
    counted = "the last round" if c.rounds == "last" else f"{len(c.per_round)} round(s)"
    sign = " (negated: less is better)" if c.metric == "loss" else ""
    return f"{c.split} {c.metric}{sign}, summed over {counted}"


def _fmt(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:+.4f}"


def _ci(s: SiteContribution) -> str:
    return "exact" if s.ci95 is None else f"[{s.ci95[0]:+.4f}, {s.ci95[1]:+.4f}]"


def _notes(c: Contribution) -> list[str]:
    notes = [f"sum of Shapley values = the gain of all updates over none: {_fmt(c.gain)}"] if c.method == "shapley" else []
    notes += [f"round {rnd} left out: {why}" for rnd, why in c.skipped]
    return notes


def contribution_table(c: Contribution) -> Table:
    """The per-site figures as a rich table for the terminal."""
    from rich.table import Table

    table = Table(title=f"contribution of each site to {_what(c)}", caption="; ".join(_notes(c)) or None)
    table.add_column("site")
    if c.method == "shapley":
        table.add_column("Shapley", justify="right")
        table.add_column("95% interval", justify="right")
    table.add_column("leave-one-out", justify="right")
    table.add_column("rounds", justify="right")
    for s in c.sites:
        shapley = [_fmt(s.shapley), _ci(s)] if c.method == "shapley" else []
        table.add_row(s.site, *shapley, _fmt(s.loo), str(s.rounds))
    return table


def contribution_figure(c: Contribution) -> Figure:
    """Horizontal bars per site: the Shapley value (with its 95% interval when sampled) and
    the leave-one-out figure."""
    from matplotlib.figure import Figure

    n = len(c.sites)
    fig = Figure(figsize=(6.4, 0.9 + 0.42 * n))
    fig.subplots_adjust(left=0.22, right=0.97, bottom=0.5 / (0.9 + 0.42 * n) + 0.05, top=0.92)
    ax = fig.subplots()
    y = list(range(n))[::-1]
    names = [s.site for s in c.sites]
    height = 0.38 if c.method == "shapley" else 0.6
    if c.method == "shapley":
        values = [s.shapley or 0.0 for s in c.sites]
        err = [[v - s.ci95[0] if s.ci95 else 0.0 for v, s in zip(values, c.sites)],
               [s.ci95[1] - v if s.ci95 else 0.0 for v, s in zip(values, c.sites)]]
        ax.barh([v + height / 2 for v in y], values, height, color="#1b6ec2", label="Shapley",
                xerr=err if any(s.ci95 for s in c.sites) else None, capsize=3)
        ax.barh([v - height / 2 for v in y], [s.loo for s in c.sites], height, color="#d95f02", label="leave-one-out")
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.barh(y, [s.loo for s in c.sites], height, color="#d95f02")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel(f"contribution to {c.split} {c.metric}" + (" (negated)" if c.metric == "loss" else ""), fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


def contribution_section(c: Contribution | None, png: Callable[[Figure], str]) -> str:
    """The report's section (empty when the run has no contribution figures); ``png``
    turns a figure into an inline <img> (report.py's)."""
    if c is None:
        return ""
    from medfed.tracking.tables import html_table

    header = ["site", *(["Shapley", "95% interval"] if c.method == "shapley" else []), "leave-one-out", "rounds"]
    rows = [[s.site, *([_fmt(s.shapley), _ci(s)] if c.method == "shapley" else []), _fmt(s.loo), str(s.rounds)]
            for s in c.sites]
    method = ("Shapley values of each round's gain (GTG-Shapley), rebuilt from the updates the server received, "
              "and leave-one-out" if c.method == "shapley" else "leave-one-out, rebuilt from the updates the server "
              "received")
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in _notes(c))
    return (f"<h2>Contribution of each site</h2>\n<p class=\"note\">{escape(method)}; {escape(_what(c))}. "
            f"A site's figure is what its updates added to the model's {escape(c.metric)}; zero or below: its "
            f"updates did not help.</p>\n" + html_table(header, rows) + notes + png(contribution_figure(c)))
