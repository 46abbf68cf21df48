"""The command line: ``medfed run | validate | report``.

Errors that a user can cause are printed as one clear message (no traceback) and the
command exits with status 2 (bad job or data) or 1 (a run that failed on the way).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medfed.config import Job, builtin_job_path, load_job
from medfed.core.errors import ConfigError, DataError, MedfedError, ModelError, RunDirError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning for medical imaging.")
out = Console()
err = Console(stderr=True)

_USER_ERRORS = (ConfigError, DataError, ModelError, RunDirError)


def _fail(e: MedfedError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, _USER_ERRORS) else 1)


def _setup_logging() -> None:
    logger = logging.getLogger("medfed")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        h = RichHandler(console=err, show_path=False, show_time=False)
        h.setLevel(logging.WARNING)  # round-by-round INFO goes to run.log only
        logger.addHandler(h)


@app.command()
def run(
    job_file: Optional[Path] = typer.Argument(None, help="Job YAML. Omit to run the built-in quick-start example."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (overrides the job's output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run a federated job with its baselines; write metrics, models and a report."""
    _setup_logging()
    try:
        if job_file is None:
            job = load_job(builtin_job_path("quickstart"))
            if output is None:
                output = Path("runs") / f"quickstart-{datetime.now():%Y%m%d-%H%M%S}"
            out.print("[bold]medfed quick start[/]: 3 synthetic hospitals, FedAvg vs local vs centralized")
        else:
            job = load_job(job_file)
        if output is not None:
            job = job.model_copy(update={"output": output})
        result = _run_with_progress(job, overwrite, quiet)
    except MedfedError as e:
        _fail(e)
        return
    _print_summary(result.run_dir, job)
    out.print(f"run folder: [bold]{result.run_dir}[/]  ({result.elapsed_s:.1f} s)")
    out.print(f"report:     [bold]{result.run_dir / 'report.html'}[/]")


def _run_with_progress(job: Job, overwrite: bool, quiet: bool):
    from medfed.server.runner import run_job

    arms = ["federated", *job.compare]
    with Progress(
        TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=out, disable=quiet, transient=False,
    ) as progress:
        tasks = {a: progress.add_task(a, total=1 if a == "finetuned" else job.rounds, info="") for a in arms}

        def on_sites(rows: list[dict]) -> None:
            if quiet:
                return
            for r in rows:
                counts = ", ".join(f"{k}={v}" for k, v in enumerate(r["class_counts"]["train"]))
                extra = "  [yellow]held out[/]" if r.get("held_out") else ""
                if r.get("skipped"):
                    extra += f"  [yellow]{len(r['skipped'])} file(s) skipped[/]"
                progress.console.print(
                    f"  site [bold]{r['name']}[/]: train {r['train']}, val {r['val']}, test {r['test']} "
                    f"(train class counts {counts}){extra}", highlight=False
                )

        def on_round(s, _params) -> None:
            parts = []
            if s.train_loss is not None:
                parts.append(f"loss {s.train_loss:.3f}")
            val = s.means.get("val", {}).get(job.task.monitor)
            if val is not None:
                parts.append(f"val {job.task.monitor} {val:.3f}")
            progress.update(tasks[s.arm.value], completed=s.round, info="  ".join(parts))

        return run_job(job, overwrite=overwrite, on_round=on_round, on_sites=on_sites)


def _print_summary(run_dir: Path, job: Job) -> None:
    from medfed.tracking.metrics import read_metrics
    from medfed.tracking.report import summary_table

    out.print(summary_table(read_metrics(run_dir / "metrics.jsonl"), job.task.monitor))


@app.command()
def validate(job_file: Path = typer.Argument(..., help="Job YAML to check.")) -> None:
    """Check a job file without running it (the schema, then the model and algorithm)."""
    try:
        job = load_job(job_file)
        _check_model_and_algorithm(job)
    except MedfedError as e:
        _fail(e)
        return
    out.print(
        f"[green]ok[/]: '{job.name}', {len(job.site_names)} sites ({', '.join(job.site_names)}), "
        f"{job.algorithm.name}, {job.rounds} rounds, model {job.model.name}"
        + (f", compared with {', '.join(job.compare)}" if job.compare else ""),
        highlight=False,
    )


def _check_model_and_algorithm(job: Job) -> None:
    """Build the model and the algorithm once: catches what needs the model (e.g. a
    personal layer name that is not a layer of it). The data is not read here."""
    from medfed.algorithms import build_algorithm
    from medfed.models import build_model, check_input_size

    model = build_model(job.model, job.task, getattr(job.data, "channels", 1), spatial_dims=job.data_dims or 2)
    if job.transforms.patch is not None:
        check_input_size(job.model, tuple(job.transforms.patch), tuple(job.transforms.patch))
    build_algorithm(job.algorithm, model, len(job.training_sites), job.train.momentum)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by `medfed run`.")) -> None:
    """Rebuild report.html of a run folder."""
    from medfed.tracking.report import write_report

    try:
        path = write_report(run_dir)
    except MedfedError as e:
        _fail(e)
        return
    out.print(f"report: [bold]{path}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
