"""The command line: ``medfed run | validate | report | compare | loso | dashboard`` here;
``provision``, ``server``, ``submit`` and ``jobs`` (server/commands.py), ``site``
(site/commands.py) and ``he-keys`` (privacy/he/commands.py) registered from the modules
of their parts.

Errors that a user can cause are printed as one clear message (no traceback) and the
command exits with status 2 (bad job or data) or 1 (a run that failed on the way):
terminal.py.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medfed import terminal
from medfed.config import Job, builtin_job_path, load_job
from medfed.core.errors import ConfigError, MedfedError
from medfed.privacy.he.commands import he_keys
from medfed.server.commands import jobs_app, provision, serve
from medfed.server.commands import submit as submit_job
from medfed.site.commands import site_app
from medfed.terminal import err, fail, out, print_run, setup_logging

if TYPE_CHECKING:
    from medfed.core.summary import SiteSummary

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning for medical imaging.")


@app.command()
def run(
    job_file: Optional[Path] = typer.Argument(None, help="Job YAML. Omit to run the built-in quick-start example."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (overrides the job's output)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run into this output that was stopped (killed, power loss, Ctrl-C), "
                                "after its last completed round; the job file must be unchanged."),
) -> None:
    """Run a federated job with its baselines; write metrics, models and a report."""
    setup_logging()
    try:
        if job_file is None:
            job = load_job(builtin_job_path("quickstart"))
            if output is None:
                output = Path("runs") / f"quickstart-{datetime.now():%Y%m%d-%H%M%S}"
            out.print("[bold]medfed quick start[/]: 3 synthetic hospitals; FedAvg fails the small clinic (hospital_c), "
                      "fine-tuning at each site (finetuned) recovers it; vs local and centralized")
        else:
            job = load_job(job_file)
        if output is not None:
            job = job.model_copy(update={"output": output})
        if resume and job_file is None:
            raise ConfigError("--resume needs the job file of the stopped run, and its output (-o)")
        result = _run_with_progress(job, overwrite, quiet, resume)
    except MedfedError as e:
        fail(e)
        return
    print_run(result.run_dir, job, result.elapsed_s)


def _run_with_progress(job: Job, overwrite: bool, quiet: bool, resume: bool = False):
    from medfed.server.runner import run_job

    arms = ["federated", *job.compare]
    with Progress(
        TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=out, disable=quiet, transient=False,
    ) as progress:
        tasks = {a: progress.add_task(a, total=1 if a == "finetuned" else job.rounds, info="") for a in arms}

        def on_sites(rows: list[SiteSummary]) -> None:
            if quiet:
                return
            for r in rows:
                found = r.class_counts.get("train")
                counts = "not read at start" if found is None else ", ".join(f"{k}={v}" for k, v in enumerate(found))
                extra = "  [yellow]held out[/]" if r.held_out else ""
                if r.unlabeled:  # semi-supervised: the class counts are the labeled examples'
                    extra += f"  {r.labeled} labeled, {r.unlabeled} unlabeled"
                if r.skipped:
                    extra += f"  [yellow]{r.skipped} file(s) skipped[/]"
                progress.console.print(
                    f"  site [bold]{escape(r.name)}[/]: train {r.train}, val {r.val}, test {r.test} "
                    + ("" if job.task.kind == "reconstruction" else f"(train class counts {counts})")  # targets are images
                    + extra, highlight=False
                )

        def on_round(s, _params) -> None:
            parts = []
            if s.train_loss is not None:
                parts.append(f"loss {s.train_loss:.3f}")
            val = s.means.get("val", {}).get(job.task.monitor)
            if val is not None:
                parts.append(f"val {job.task.monitor} {val:.3f}")
            if s.epsilon is not None:
                parts.append(f"ε {s.epsilon:.3g}")
            progress.update(tasks[s.arm.value], completed=s.round, info="  ".join(parts))

        return run_job(job, overwrite=overwrite, on_round=on_round, on_sites=on_sites, resume=resume)


@app.command()
def loso(
    job_file: Path = typer.Argument(..., help="Job YAML with 3 or more training sites."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: <job output>-loso)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing loso or run folder."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Runs at once, each in its own process."),
    with_run: Optional[Path] = typer.Option(
        None, "--with", help="A finished run of this job to take the sites' figures when they train from (else run)."
    ),
) -> None:
    """Leave one site out: run the job with each training site held out in turn; each site's metric unseen vs trained."""
    from medfed.server.loso import FULL_RUN, run_loso
    from medfed.tracking.loso import rich_table

    setup_logging()
    try:
        job = load_job(job_file)

        def on_run(name: str, seconds: float) -> None:
            what = "full run (every site trains)" if name == FULL_RUN else f"'{escape(name)}' left out"
            out.print(f"  done: {what}  (at {seconds:.1f} s)", highlight=False)

        result = run_loso(job, output, overwrite, parallel, with_run, on_run)
    except MedfedError as e:
        fail(e)
        return
    out.print(rich_table(result.table))
    for note in result.table["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    out.print(f"loso folder: [bold]{result.out_dir}[/]  ({result.elapsed_s:.1f} s)")
    out.print(f"table:       [bold]{result.out_dir / 'loso.md'}[/], figure: [bold]{result.out_dir / 'loso.png'}[/]")


@app.command()
def validate(job_file: Path = typer.Argument(..., help="Job YAML to check.")) -> None:
    """Check a job file without running it (the schema, then the model and algorithm)."""
    try:
        job = load_job(job_file)
        _check_model_and_algorithm(job)
    except MedfedError as e:
        fail(e)
        return
    out.print(
        f"[green]ok[/]: '{job.name}', {len(job.site_names)} sites ({', '.join(job.site_names)}), "
        f"{job.algorithm.name}" + (f" by {job.topology.label}" if job.topology.kind != "server" else "")
        + f", {job.rounds} rounds, model {job.model.label}"
        + (f", compared with {', '.join(job.compare)}" if job.compare else ""),
        highlight=False,
    )


def _check_model_and_algorithm(job: Job) -> None:
    """Build the model, the task's loss and the algorithm once (server/jobcheck.py)."""
    from medfed.server.jobcheck import check_model_and_algorithm

    check_model_and_algorithm(job)


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", help="Run folders written by `medfed run`, of the same task."
    ),
    output: Path = typer.Option(
        Path("compare.png"), "--output", "-o", help="The figure (PNG; a folder: FOLDER/compare.png)."
    ),
    metric: Optional[str] = typer.Option(None, "--metric", help="The metric (default: the first run's task.monitor)."),
    split: str = typer.Option("test", "--split", help="test, val or train."),
) -> None:
    """Several runs side by side: each arm's mean over the sites and its spread; a figure by round."""
    from medfed.tracking.compare import check_metric, compare_rows, default_metric, figure, load_runs, rich_table

    try:
        if split not in ("train", "val", "test"):
            raise ConfigError(f"--split: must be train, val or test, got '{split}'")
        runs = load_runs(run_dirs)
        metric = metric or default_metric(runs)
        check_metric(runs, metric, split)
        out.print(rich_table(compare_rows(runs, metric, split), metric, split))
        path = figure(runs, metric, split, output)
    except MedfedError as e:
        fail(e)
        return
    out.print(f"figure: [bold]{escape(str(path))}[/]", highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by `medfed run`.")) -> None:
    """Rebuild report.html of a run folder."""
    from medfed.tracking.report import write_report

    try:
        path = write_report(run_dir)
    except MedfedError as e:
        fail(e)
        return
    out.print(f"report: [bold]{path}[/]")


@app.command()
def dashboard(
    run_dir: Path = typer.Argument(..., help="A run folder: the output of `medfed run` (followed from its staging "
                                   "folder while it runs) or of `medfed server`."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any other than 127.0.0.1 exposes the "
                             "run to the network."),
) -> None:
    """A live web page of a run, in progress or finished (Ctrl-C stops it)."""
    from medfed.dashboard.server import exposure_warning, is_loopback, start

    setup_logging(logging.INFO)
    try:
        server = start(run_dir, host, port)
    except MedfedError as e:
        fail(e)
        return
    if not is_loopback(host):
        err.print(f"[bold yellow]warning:[/] {escape(exposure_warning(server))}", highlight=False)
    out.print(f"dashboard of {escape(str(run_dir))}: {escape(server.url)}", highlight=False, soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


app.command()(provision)  # server/commands.py: the consortium's CA and kits, revocation
app.command("server")(serve)  # server/commands.py: a job, or a queue of jobs, served over mutual TLS
app.add_typer(site_app, name="site")  # site/commands.py: medfed site [--kit ...] | site approve | site reject
app.command("submit")(submit_job)  # server/commands.py: an admin's job to a queue server
app.add_typer(jobs_app, name="jobs")  # medfed jobs list | show ID | abort ID
app.command("he-keys")(he_keys)  # privacy/he/commands.py


def main() -> None:
    terminal.PROGRAM = True  # this process owns its stderr (not app() called in-process)
    app()


if __name__ == "__main__":
    main()
