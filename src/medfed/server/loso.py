"""Leave one site out (``medfed loso``): for each training site in turn, the job run with
that site held out (it never trains, in any arm, and is evaluated with the models the
others trained), and the job run as it is (every site trains, folder ``all``). The table
(tracking/loso.py) sets each site's metric when unseen next to its metric when it trains.

Every run is :func:`~medfed.server.runner.run_job` on a copy of the job with ``held_out``
and ``output`` set, so each is an ordinary run folder, and the job's seed makes it the same
run whether it runs here or in a worker process (``parallel``: a spawned process pool;
the runs share nothing but the data files). Like a run, the whole folder is built next to
the output and moved into place only when every run, the table and the figure are written;
a ``run.json`` marks it as medfed's, so ``overwrite`` may replace it later.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.config import Job, TrackingConfig, parse_job
from medfed.core.errors import ConfigError, MedfedError, RunDirError
from medfed.core.files import atomic_write_text
from medfed.server.runner import (
    RUN_MARKER,
    check_output,
    check_replaceable,
    make_staging,
    move_into_place,
    run_job,
)

FULL_RUN = "all"  # the folder of the run where every site trains ("all" is never a site name)
MIN_TRAINING_SITES = 3  # so that every run leaving one out still federates 2 or more


@dataclass(frozen=True)
class LosoResult:
    out_dir: Path
    table: dict[str, Any]
    elapsed_s: float


def default_output(job: Job) -> Path:
    """``<job output>-loso``, next to the job's own run folder."""
    return job.output.with_name(f"{job.output.name}-loso")


def _sites_field(job: Job) -> str:
    return "data.partition.sites" if getattr(job.data, "partition", None) is not None else "data.sites"


def loso_jobs(job: Job, out_dir: Path) -> dict[str, Job]:
    """Per training site, the job with that site held out and its output under ``out_dir``,
    each checked as a job of its own (a setting that needs every site, such as
    ``sampling.count``, is refused naming the site left out). ConfigError for a job with
    fewer than 3 training sites."""
    sites = job.training_sites
    if len(sites) < MIN_TRAINING_SITES:
        held = f" (held_out already takes {', '.join(job.held_out)})" if job.held_out else ""
        raise ConfigError(
            f"{_sites_field(job)}: leave one site out needs at least {MIN_TRAINING_SITES} training sites, so that "
            f"every run still federates 2 or more; the job has {len(sites)} ({', '.join(sites)}){held}"
        )
    jobs = {}
    for site in sites:
        raw = job.model_dump(mode="json")
        raw["held_out"] = [*job.held_out, site]
        raw["output"] = str(out_dir / site)
        jobs[site] = parse_job(raw, source=f"the job with site '{site}' left out")
    return jobs


def _check_full_run(run_dir: Path, job: Job, out_dir: Path) -> Path:
    """``--with RUN_DIR``: a complete run of this very job (the same job hash), outside the
    folder that loso writes (which it may replace)."""
    run_dir = run_dir.resolve()
    marker = run_dir / RUN_MARKER
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunDirError(f"--with: '{run_dir}' has no readable {RUN_MARKER}; give a run folder written by "
                          "`medfed run`") from None
    if not isinstance(meta, dict) or meta.get("status") != "complete" or "job_hash" not in meta:
        raise RunDirError(f"--with: '{run_dir}' is not a complete run folder of `medfed run`")
    if meta["job_hash"] != job.job_hash():
        raise RunDirError(
            f"--with: '{run_dir}' is a run of another job (job hash {str(meta['job_hash'])[:16]}, this job's is "
            f"{job.job_id}); the sites' figures when they train must come from the same job: omit --with to run it"
        )
    if run_dir == out_dir or out_dir in run_dir.parents:
        raise RunDirError(f"--with: '{run_dir}' lies inside the output folder '{out_dir}', which loso replaces; "
                          "move it or choose another output")
    return run_dir


def _run_one(job: Job) -> Path:
    """One run (a process pool's task: a module-level function, picklable)."""
    return run_job(job).run_dir


def _named(e: MedfedError, name: str) -> MedfedError:
    """The error of one run, its message prefixed with which run it was."""
    try:
        return type(e)(f"{name}: {e}")
    except TypeError:  # an error class with more arguments: as it is
        return e


def _label(name: str) -> str:
    return "the full run" if name == FULL_RUN else f"the run leaving out '{name}'"


def _run_all(jobs: dict[str, Job], parallel: int, on_run: Callable[[str, float], None] | None) -> None:
    """Run ``jobs`` (name -> job): here one after the other, or in ``parallel`` spawned
    processes. The first failure stops the others (those not started are cancelled)."""
    t0 = time.perf_counter()
    if parallel <= 1:
        for name, j in jobs.items():
            try:
                _run_one(j)
            except MedfedError as e:
                raise _named(e, _label(name)) from None
            if on_run is not None:
                on_run(name, time.perf_counter() - t0)
        return
    ctx = multiprocessing.get_context("spawn")  # no forked torch state; the same on every platform
    with ProcessPoolExecutor(max_workers=min(parallel, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(_run_one, j): name for name, j in jobs.items()}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in sorted(done, key=lambda f: list(jobs).index(futures[f])):
                    try:
                        f.result()
                    except MedfedError as e:
                        raise _named(e, _label(futures[f])) from None
                    if on_run is not None:
                        on_run(futures[f], time.perf_counter() - t0)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _track(runs: dict[str, Job], out: Path, tracking: TrackingConfig, study: str) -> None:
    """Each run of the study, now in ``out``, to the job's trackers: TensorBoard event
    files in each run folder, one MLflow run each (by default in ``out/mlflow.db``) tagged
    with the study and the site left out. A reused full run (``--with``) is not sent again."""
    from medfed.tracking.external import track_finished

    for name, j in runs.items():
        left_out = "none" if name == FULL_RUN else name
        track_finished(j.model_copy(update={"output": out / name, "tracking": tracking}), out / name,
                       {"medfed.loso": study, "medfed.loso.left_out": left_out})


def run_loso(
    job: Job,
    output: Path | None = None,
    overwrite: bool = False,
    parallel: int = 1,
    full_run: Path | None = None,
    on_run: Callable[[str, float], None] | None = None,
) -> LosoResult:
    """Leave each training site out in turn; write the runs, ``loso.json``, ``loso.md`` and
    ``loso.png`` to ``output`` (default :func:`default_output`). ``full_run``: reuse that run
    of the job for the sites' figures when they train instead of running it (folder ``all``).
    ``on_run(name, seconds)`` is called as each run finishes (``name``: a site, or ``all``)."""
    from medfed.tracking.loso import figure, loso_table, markdown, write_json
    from medfed.tracking.report import write_report

    if parallel < 1:
        raise ConfigError(f"--parallel: needs 1 or more processes, got {parallel}")
    tracking = job.tracking  # its runs are built in a staging folder and moved: each is tracked once in place
    if tracking is not None:
        from medfed.tracking.external import check_tracking

        check_tracking(job, reach=True)  # a tool missing, a server not answering: before any run
        job = job.model_copy(update={"tracking": None})
    t0 = time.perf_counter()
    out = (output if output is not None else default_output(job)).resolve()
    check_replaceable(out)
    check_output(out, overwrite)
    loso_jobs(job, out)  # every refusal before anything is written or run
    reused = _check_full_run(full_run, job, out) if full_run is not None else None
    staging = make_staging(out, "the folder")
    try:
        runs = loso_jobs(job, staging)
        todo = dict(runs) if reused is not None else {FULL_RUN: job.model_copy(update={"output": staging / FULL_RUN}),
                                                      **runs}
        _run_all(todo, parallel, on_run)
        for name, j in todo.items():  # job.yaml and the report name where each run ends up, not the staging folder
            atomic_write_text(staging / name / "job.yaml", j.model_copy(update={"output": out / name}).to_yaml())
            write_report(staging / name)
        table = loso_table(reused or staging / FULL_RUN, {s: staging / s for s in runs}, job.task.monitor, job.name,
                           full_label=str(reused) if reused is not None else FULL_RUN)
        write_json(table, staging / "loso.json")
        atomic_write_text(staging / "loso.md", markdown(table))
        figure(table, staging / "loso.png")
        marker = {"status": "complete", "kind": "loso", "job_hash": job.job_hash(), "sites": list(runs),
                  "full_run": table["full_run"], "finished": datetime.now(UTC).isoformat()}
        atomic_write_text(staging / RUN_MARKER, json.dumps(marker, indent=2) + "\n")
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise RunDirError(f"cannot write next to '{out}': {e}; nothing was written") from None
        raise
    try:
        move_into_place(staging, out)
    except OSError as e:
        raise RunDirError(f"cannot move the finished folder into '{out}': {e}; it is left in '{staging}'") from None
    if tracking is not None:
        _track(todo, out, tracking, job.name)
    return LosoResult(out_dir=out, table=table, elapsed_s=time.perf_counter() - t0)
