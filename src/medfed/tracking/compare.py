"""Several runs side by side (``medfed compare RUN_DIR...``): method against method, from
each run folder's ``metrics.jsonl``, ``run.json`` and ``job.yaml`` alone (no tracking tool).

One row per run and arm: the metric's example-weighted mean over the training sites (site
``all``; where a run records none, as for the training loss, the plain mean of the training
sites) at the arm's last round and at the round of its best validation mean, then the
spread across the training sites at the last round (worst and best site, standard
deviation, gap: :func:`~medfed.tracking.metrics.spreads`, the computation every table
uses). The figure draws the mean by round, one line per run and arm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from medfed.core.errors import ConfigError, RunDirError
from medfed.core.types import lower_is_better
from medfed.tracking.metrics import ARMS, CONSORTIUM_SITES, MEAN_SITE, last_rounds, read_metrics, spreads
from medfed.tracking.tables import fmt

DEFAULT_FIGURE = "compare.png"
PERSONAL_ARMS = {"federated": "", "personalized": " (personal)", "finetuned": " + fine-tuning"}


@dataclass(frozen=True)
class RunInfo:
    """One run folder as compare reads it: its job (as saved, not re-validated: its data
    need not exist here), its run.json and its metric records."""

    path: Path
    label: str
    job: dict[str, Any]
    meta: dict[str, Any]
    records: list[dict]

    @property
    def task(self) -> dict[str, Any]:
        task = self.job.get("task")
        return task if isinstance(task, dict) else {}

    @property
    def algorithm(self) -> str:
        algo = self.job.get("algorithm")
        return str(algo.get("name", "fedavg")) if isinstance(algo, dict) else "fedavg"

    @property
    def held_out(self) -> list[str]:
        held = self.job.get("held_out")
        return [str(s) for s in held] if isinstance(held, list) else []

    @property
    def job_hash(self) -> str:
        return str(self.meta.get("job_hash") or "")

    def task_text(self) -> str:
        """The task in words: ``binary classification``, ``segmentation (3 classes)``."""
        t = self.task
        if t.get("kind") == "segmentation":
            return f"segmentation ({t.get('num_classes')} classes)"
        labels = t.get("labels", "binary")
        return "binary classification" if labels == "binary" else f"{labels} classification ({t.get('num_classes')} classes)"

    def method(self, arm: str) -> str:
        """What trained this arm's model: the algorithm for the federation's arms, the arm
        itself for the baselines."""
        return self.algorithm + PERSONAL_ARMS[arm] if arm in PERSONAL_ARMS else arm


def load_run(path: Path, label: str | None = None) -> RunInfo:
    """Read one run folder; a RunDirError naming it when it is not a finished medfed run."""
    from medfed.config import read_yaml

    if not path.is_dir():
        raise RunDirError(f"'{path}' is not a run folder: {'no such folder' if not path.exists() else 'not a folder'}")
    marker = path / "run.json"
    meta = _read_json(marker)
    if meta is None:
        inner = sorted(p.name for p in path.iterdir() if (p / "run.json").is_file())[:5]
        hint = f"; it holds run folders ({', '.join(inner)}): name them" if inner else ""
        raise RunDirError(f"'{path}' is not a run folder written by medfed: it has no readable run.json{hint}")
    if meta.get("kind") == "loso":
        sites = ", ".join(str(s) for s in meta.get("sites", [])) or "..."
        raise RunDirError(f"'{path}' is a leave-one-site-out folder, not a run; compare the runs in it "
                          f"(its sub-folders {sites}, all)")
    for name in ("metrics.jsonl", "job.yaml"):
        if not (path / name).is_file():
            raise RunDirError(f"'{path}' is not a complete run folder: it has no {name}")
    try:
        job = read_yaml(path / "job.yaml", "job file")
    except ConfigError as e:
        raise RunDirError(str(e)) from None
    if not isinstance(job, dict):
        raise RunDirError(f"'{path / 'job.yaml'}' does not hold a job")
    return RunInfo(path, label or path.name, job, meta, read_metrics(path / "metrics.jsonl"))


def _read_json(path: Path) -> dict | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_runs(paths: Sequence[Path]) -> list[RunInfo]:
    """Read the run folders (labelled by folder name, or more of the path where two
    names are the same) and check that they ran the same task."""
    if not paths:
        raise ConfigError("compare: give one or more run folders")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ConfigError(f"compare: '{p}' is given twice")
        seen[key] = p
    names = [p.resolve().name for p in paths]
    labels = [str(Path(p.resolve().parent.name) / p.resolve().name) if names.count(p.resolve().name) > 1
              else p.resolve().name for p in paths]
    runs = [load_run(Path(p), label) for p, label in zip(paths, labels)]
    first = runs[0]
    for run in runs[1:]:
        if _task_key(run) != _task_key(first):
            raise ConfigError(
                f"compare: the runs do not share a task, so their metrics do not compare: '{first.label}' is "
                f"{first.task_text()}, '{run.label}' is {run.task_text()}"
            )
    return runs


def _task_key(run: RunInfo) -> tuple:
    t = run.task
    kind = t.get("kind", "classification")
    return (kind, None if kind == "segmentation" else t.get("labels", "binary"), t.get("num_classes"))


def default_metric(runs: Sequence[RunInfo]) -> str:
    """The first run's monitored metric (``task.monitor``)."""
    t = runs[0].task
    return str(t.get("monitor") or ("dice" if t.get("kind") == "segmentation" else "auc"))


def check_metric(runs: Sequence[RunInfo], metric: str, split: str) -> None:
    """Every run has ``metric`` on ``split``; a ConfigError naming the run and the metrics it
    has there otherwise."""
    for run in runs:
        here = {r["metric"] for r in run.records if r["split"] == split}
        if metric in here:
            continue
        if not here:
            splits = sorted({r["split"] for r in run.records})
            raise ConfigError(f"compare: run '{run.label}' ({run.path}) has no records on the {split} split; "
                              f"its splits: {', '.join(splits) or 'none'}")
        raise ConfigError(f"compare: run '{run.label}' ({run.path}) has no metric '{metric}' on the {split} split; "
                          f"its {split} metrics: {', '.join(sorted(here))}")


def _mean_by_round(records: list[dict], arm: str, metric: str, split: str,
                   held_out: Sequence[str] = ()) -> dict[int, float | None]:
    """Per round, the arm's ``all`` record; where it has none (the training loss), the
    plain mean of the training sites' defined values (None if none is defined)."""
    mean: dict[int, float | None] = {}
    sites: dict[int, list[float]] = {}
    for r in records:
        if r["arm"] != arm or r["split"] != split or r["metric"] != metric:
            continue
        if r["site"] == MEAN_SITE:
            mean[r["round"]] = r["value"]
        elif r["site"] not in CONSORTIUM_SITES and r["site"] not in held_out:
            values = sites.setdefault(r["round"], [])
            if r["value"] is not None:
                values.append(r["value"])
    for rnd, values in sites.items():
        if rnd not in mean:
            mean[rnd] = sum(values) / len(values) if values else None
    return dict(sorted(mean.items()))


def compare_rows(runs: Sequence[RunInfo], metric: str, split: str = "test") -> list[dict]:
    """One row per run and arm, in the order given and :data:`ARMS` order: ``run``,
    ``method``, ``arm``, ``round`` (the last), ``final`` (the mean at the last round),
    ``best_round`` and ``at_best`` (the mean at the round of the best validation mean; None
    without validation records), ``spread`` (a :class:`~medfed.tracking.metrics.Spread`)
    and ``job_hash``."""
    lower = lower_is_better(metric)
    rows = []
    for run in runs:
        last = last_rounds(run.records, split)
        by_arm = spreads(run.records, metric, split, run.held_out)
        for arm in ARMS:
            if arm not in last:
                continue
            means = _mean_by_round(run.records, arm, metric, split, run.held_out)
            val = {k: v for k, v in _mean_by_round(run.records, arm, metric, "val", run.held_out).items()
                   if v is not None}
            best_round = None
            if val:  # the first of equal values: the earliest round
                best_round = (min if lower else max)(sorted(val), key=lambda k: val[k])
            rows.append({"run": run.label, "method": run.method(arm), "arm": arm, "round": last[arm],
                         "final": means.get(last[arm]), "best_round": best_round,
                         "at_best": means.get(best_round) if best_round is not None else None,
                         "spread": by_arm.get(arm), "job_hash": run.job_hash})
    return rows


def rich_table(rows: list[dict], metric: str, split: str) -> Table:
    """The rows of :func:`compare_rows` for the terminal."""
    table = Table(title=f"{split} {metric}: mean over the training sites (example-weighted) and spread across them",
                  caption="at best val: at the round of the best validation mean; spread at the last round, "
                          "each training site counting once")
    for name, justify in (("run", "left"), ("method", "left"), ("arm", "left"), ("rounds", "right"),
                          ("final", "right"), ("at best val", "right"), ("worst site", "right"),
                          ("best site", "right"), ("std", "right"), ("gap", "right"), ("job hash", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    previous = None
    for r in rows:
        sp = r["spread"]
        at_best = fmt(r["at_best"]) + (f" (r{r['best_round']})" if r["best_round"] is not None else "")
        cells = [
            r["run"] if r["run"] != previous else "", r["method"], r["arm"], str(r["round"]), fmt(r["final"]), at_best,
            _site_cell(sp, "worst"), _site_cell(sp, "best"),
            fmt(sp.std if sp else None), fmt(sp.gap if sp else None), r["job_hash"][:12],
        ]
        table.add_row(*[Text(c) for c in cells])
        previous = r["run"]
    return table


def _site_cell(sp: Any, name: str) -> str:
    if sp is None or sp.figure(name) is None:
        return fmt(None)
    return f"{fmt(sp.figure(name))} ({sp.site(name)})"


def figure(runs: Sequence[RunInfo], metric: str, split: str, path: Path) -> Path:
    """A PNG at ``path`` (a folder: ``path/compare.png``): the mean of ``metric`` on
    ``split`` by round, one line per run (colour) and arm (line style). Returns the file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if path.is_dir():
        path = path / DEFAULT_FIGURE
    styles = {"federated": "-", "local": ":", "centralized": "--", "finetuned": "-.", "personalized": (0, (5, 1, 1, 1)),
              "pretrain": (0, (1, 1))}
    fig = Figure(figsize=(8.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for arm in ARMS:
            means = _mean_by_round(run.records, arm, metric, split, run.held_out)
            if not means:
                continue
            rounds = sorted(means)
            values = [math.nan if means[k] is None else means[k] for k in rounds]
            ax.plot(rounds, values, linestyle=styles[arm], marker="o", markersize=3, color=colour,
                    label=f"{run.label}: {run.method(arm)}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} {metric} (mean over the training sites)")
    ax.set_title(f"{split} {metric} by round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise RunDirError(f"cannot write the figure '{path}': {e.strerror or e}") from None
    return path
