"""The Python API: run a job from a script or a notebook, with your own data and network.

``medfed.run`` runs exactly what ``medfed run`` runs (the federation, the baselines, the
report, the same run folder); ``medfed.load_job`` and ``medfed.validate`` read and check a
job the way the command line does. Importing this module does not import torch: that
happens when a run starts or a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from medfed.config import Job
from medfed.config.files import load_job, parse_job, read_yaml
from medfed.core.errors import ConfigError

if TYPE_CHECKING:
    import pandas

    from medfed.data.user import UserDatasets
    from medfed.models import ModelFactory

__all__ = ["JobSpec", "Result", "load_job", "run", "validate"]

# a job: a YAML file's path, the mapping such a file holds, or a parsed Job
JobSpec = Union[str, Path, Mapping, Job]


@dataclass(frozen=True)
class Result:
    """A finished run: ``run_dir``, the run folder (as ``medfed run`` writes it);
    ``metrics``, the records of its ``metrics.jsonl``, in file order; ``job``, the job
    that ran; ``elapsed_s``, its wall time in seconds."""

    run_dir: Path
    metrics: list[dict] = field(repr=False)
    job: Job = field(repr=False)
    elapsed_s: float = 0.0

    def to_pandas(self) -> "pandas.DataFrame":
        """The metrics as a pandas DataFrame, one row a record (needs pandas)."""
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "Result.to_pandas needs pandas, which is not installed: pip install pandas "
                "(Result.metrics holds the same records as a list of dicts)"
            ) from None
        return pandas.DataFrame.from_records(self.metrics)


def _placeholder_data(names: list[str], segmentation: bool) -> dict:
    """A data section naming the sites of ``datasets`` for a job that has none: the
    schema needs one, and these datasets replace it (run.json says so)."""
    sites = [{"name": n, "n_train": 1, "n_test": 1} for n in names]
    return {"source": "synthetic_segmentation" if segmentation else "synthetic", "sites": sites}


def _parse(job: JobSpec, datasets: "UserDatasets | None" = None, own_model: bool = False) -> Job:
    if isinstance(job, Job):
        return job
    if isinstance(job, (str, Path)):
        path = Path(job)
        raw, source, base = read_yaml(path, "job file"), str(path), path.parent.resolve()
    elif isinstance(job, Mapping):
        raw, source, base = dict(job), "job", None
    else:
        raise ConfigError(f"job: expected a YAML file's path, a mapping or a medfed Job, got {type(job).__name__}")
    task = raw.get("task") if isinstance(raw, dict) else None
    seg = isinstance(task, Mapping) and task.get("kind") == "segmentation"
    if datasets is not None and isinstance(raw, dict) and "data" not in raw:
        raw = {**raw, "data": _placeholder_data(list(datasets), seg)}
    if own_model and isinstance(raw, dict) and "model" not in raw:  # the schema needs one; the factory replaces it
        raw = {**raw, "model": {"name": "unet" if seg else "small_cnn"}}
    return parse_job(raw, source=source, base_dir=base)


def validate(job: JobSpec) -> Job:
    """The parsed job, checked as ``medfed validate`` checks it (the schema, then the
    model and algorithm built once) and its task's loss built (an imported one found);
    raises the :class:`~medfed.core.errors.MedfedError`
    whose message the command line prints."""
    from medfed.cli import _check_model_and_algorithm

    from medfed.tasks import build_task

    parsed = _parse(job)
    _check_model_and_algorithm(parsed)
    build_task(parsed)  # an imported task.loss is found and built
    return parsed


def run(
    job: JobSpec,
    *,
    datasets: "UserDatasets | None" = None,
    model: "ModelFactory | None" = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Result:
    """Run ``job`` (a path, a mapping or a parsed :class:`Job`) as ``medfed run`` does.

    ``datasets``: site name -> ``{"train": ds, "val": ds, "test": ds}``, each a PyTorch
    ``Dataset`` of ``(image, target)`` pairs (image (C, H, W) or (C, D, H, W); target a
    class index, a 0/1 vector for multi-label, or a mask of class indices); they replace
    the job's data source, whose site names (a job without a data section takes the keys)
    must be the same. ``model``: a function of no arguments returning a ``torch.nn.Module``,
    used in place of the job's ``model`` (which a job may then leave out; run.json
    records the network's parameter fingerprint).
    Both need ``transport: inprocess``. ``progress``: a progress bar per arm (rich; it
    renders in notebooks). Raises a :class:`~medfed.core.errors.MedfedError` naming the
    field, site, split or item that is wrong."""
    parsed = _parse(job, datasets, own_model=model is not None)
    if parsed.transport != "inprocess" and (datasets is not None or model is not None):
        from medfed.transport.base import separate_sites_refusal

        raise ConfigError(separate_sites_refusal(parsed.transport))
    if model is not None and not callable(model):
        raise ConfigError(f"model: expected a function of no arguments returning a torch.nn.Module, got "
                          f"{type(model).__name__}")
    from medfed.server.runner import run_job
    from medfed.tracking.metrics import read_metrics

    sites = None
    if datasets is not None:
        from medfed.data.user import user_sites

        if not isinstance(datasets, Mapping):
            raise ConfigError(f"datasets: expected a mapping of site name to splits, got {type(datasets).__name__}")
        sites = user_sites(datasets, list(parsed.site_names), parsed.task)
    if progress:
        done = _with_progress(parsed, lambda cb: run_job(parsed, overwrite, on_round=cb, sites=sites,
                                                           model_factory=model))
    else:
        done = run_job(parsed, overwrite, sites=sites, model_factory=model)
    return Result(run_dir=done.run_dir, metrics=read_metrics(done.run_dir / "metrics.jsonl"), job=parsed,
                  elapsed_s=done.elapsed_s)


def _with_progress(job: Job, start):
    """``start(on_round)`` under a rich progress bar per arm (rounds done of the job's)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    arms = ["federated", *job.compare]
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn()) as bar:
        tasks = {a: bar.add_task(a, total=1 if a == "finetuned" else job.rounds, info="") for a in arms}

        def on_round(s, _params) -> None:
            val = s.means.get("val", {}).get(job.task.monitor)
            info = "" if val is None else f"val {job.task.monitor} {val:.3f}"
            if s.arm.value in tasks:
                bar.update(tasks[s.arm.value], completed=s.round, info=info)

        return start(on_round)

