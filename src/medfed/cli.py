"""The command line: ``medfed run | validate | report | compare | loso | provision | server | site |
dashboard | submit | jobs``.

Errors that a user can cause are printed as one clear message (no traceback) and the
command exits with status 2 (bad job or data) or 1 (a run that failed on the way).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medfed.config import Job, builtin_job_path, load_job
from medfed.core.errors import ConfigError, DataError, MedfedError, ModelError, NetworkError, RunDirError
from medfed.privacy.he.commands import he_keys
from medfed.site.commands import site_app
from medfed.server.commands import jobs_app
from medfed.server.commands import submit as submit_job

if TYPE_CHECKING:
    from medfed.core.summary import SiteSummary

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning for medical imaging.")
out = Console()
err = Console(stderr=True)

_USER_ERRORS = (ConfigError, DataError, ModelError, RunDirError, NetworkError)


def _fail(e: MedfedError) -> None:
    # the message may hold brackets (field paths, file names): printed as it is, not as markup
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, _USER_ERRORS) else 1)


def _setup_logging(terminal_level: int = logging.WARNING) -> None:
    """medfed's log on the terminal: warnings for a simulation (round-by-round INFO goes
    to run.log only); everything for a server or site process, whose operator watches it."""
    logger = logging.getLogger("medfed")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        h = RichHandler(console=err, show_path=False, show_time=terminal_level <= logging.INFO)
        h.setLevel(terminal_level)
        logger.addHandler(h)


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
    _setup_logging()
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
        _fail(e)
        return
    _print_summary(result.run_dir, job)
    out.print(f"run folder: [bold]{result.run_dir}[/]  ({result.elapsed_s:.1f} s)")
    out.print(f"report:     [bold]{result.run_dir / 'report.html'}[/]")


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


def _print_summary(run_dir: Path, job: Job) -> None:
    from medfed.tracking.contribution import contribution_table, read_contribution
    from medfed.tracking.metrics import read_metrics
    from medfed.tracking.tables import summary_table

    out.print(summary_table(read_metrics(run_dir / "metrics.jsonl"), job.task.monitor, job.held_out))
    contribution = read_contribution(run_dir)
    if contribution is not None:
        out.print(contribution_table(contribution))


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

    _setup_logging()
    try:
        job = load_job(job_file)

        def on_run(name: str, seconds: float) -> None:
            what = "full run (every site trains)" if name == FULL_RUN else f"'{escape(name)}' left out"
            out.print(f"  done: {what}  (at {seconds:.1f} s)", highlight=False)

        result = run_loso(job, output, overwrite, parallel, with_run, on_run)
    except MedfedError as e:
        _fail(e)
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
        _fail(e)
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
        _fail(e)
        return
    out.print(f"figure: [bold]{escape(str(path))}[/]", highlight=False)


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

    _setup_logging(logging.INFO)
    try:
        server = start(run_dir, host, port)
    except MedfedError as e:
        _fail(e)
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


@app.command()
def provision(
    consortium_file: Path = typer.Argument(..., help="Consortium YAML: name, server host/port, sites."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Output folder for the CA and the kits (default: <name>-kits next to the consortium file)."
    ),
    revoke: Optional[str] = typer.Option(
        None, "--revoke", help="Revoke the certificate of this site: the CA re-signs its revocation list, copied into "
                               "the server kit (install revoked.crl.pem beside the running server's kit)."),
) -> None:
    """Create the consortium's CA and a startup kit per participant (only the missing ones)."""
    from rich.table import Table

    from medfed.transport import pki

    if revoke is not None:
        _revoke(consortium_file, out_dir, revoke)
        return
    try:
        result = pki.provision(consortium_file, out_dir)
    except MedfedError as e:
        _fail(e)
        return
    cons = result.consortium
    table = Table(title=f"consortium '{cons.name}', server {cons.server.host}:{cons.server.port}")
    for col in ("name", "role", "kit folder", "status", "expires"):
        table.add_column(col)
    for k in result.kits:
        status = "[green]created[/]" if k.status == "created" else "kept"
        if not k.in_consortium_file:
            status += " [yellow](removed from file, not revoked)[/]"
        expires = f"{k.not_after:%Y-%m-%d}" + (" [red](expired)[/]" if k.expired else "")
        table.add_row(k.name, k.role, str(k.path), status, expires)
    out.print(table)
    if result.ca_created:
        out.print(f"new CA: [bold]{result.out_dir / 'ca'}[/]")
    for note in result.notes:
        out.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(
        "Send each kit folder to its participant over a secure channel (it holds a private key). "
        f"Keep [bold]{result.out_dir / 'ca'}[/] offline and backed up: it can issue new kits, and adding a site "
        "later needs it. To reissue a kit, delete its folder and run provision again.",
        highlight=False,
    )


def _revoke(consortium_file: Path, out_dir: Optional[Path], name: str) -> None:
    from medfed.transport.pki import default_out_dir, load_consortium
    from medfed.transport.pki.revocation import revoke

    try:
        out_folder = out_dir if out_dir is not None else default_out_dir(consortium_file, load_consortium(consortium_file))
        mine, listed, server_copy = revoke(out_folder, name)
    except MedfedError as e:
        _fail(e)
        return
    out.print(f"revoked: site [bold]{escape(mine.name)}[/] (serial {mine.serial:x}, {mine.when:%Y-%m-%d %H:%M} UTC); "
              f"{len(listed)} revoked in all: {escape(', '.join(r.name for r in listed))}", highlight=False)
    out.print(f"Install [bold]{escape(str(server_copy))}[/] in the running server's kit folder (same file name): the "
              "server refuses the site at its next call, without a restart.", highlight=False)


def _join_seconds(value: Optional[float]) -> Optional[float]:
    """--join-timeout: seconds, > 0 and at most the longest round timeout a job may set (a
    week); 0 would silently mean the default, and inf cannot be waited on."""
    from medfed.config import MAX_ROUND_TIMEOUT

    if value is not None and not 0 < value <= MAX_ROUND_TIMEOUT:
        raise typer.BadParameter(f"must be > 0 and at most {MAX_ROUND_TIMEOUT:g} seconds (a week), got {value:g}")
    return value


@app.command()
def server(
    kit: Path = typer.Option(..., "--kit", help="The server's startup kit folder (from `medfed provision`)."),
    job_file: Optional[Path] = typer.Option(None, "--job", help="Job YAML: the same file a simulation runs."),
    queue: Optional[Path] = typer.Option(
        None, "--queue", help="Instead of --job: serve a queue of jobs, kept in this runs folder, one after another "
                              "(`medfed submit`, `medfed jobs` with an admin kit); runs until stopped."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run that was stopped, after its last completed round."),
    listen: Optional[str] = typer.Option(None, "--listen", help="Address to bind, host:port (default 0.0.0.0:<kit port>)."),
    join_timeout: Optional[float] = typer.Option(
        None, "--join-timeout", callback=_join_seconds,
        help="Seconds (> 0) to wait for the sites before round 1 (default: the job's round_timeout).",
    ),
    he_context: Optional[Path] = typer.Option(
        None, "--he-context",
        help="For a job with privacy.he: the consortium's public CKKS context, he-public.ctx from `medfed he-keys`.",
    ),
) -> None:
    """Serve a job (or, with --queue, a queue of jobs) to the consortium's sites over mutual TLS."""
    from medfed.server.deploy import serve_job
    from medfed.transport.grpc.handshakes import watch_refused_handshakes
    from medfed.transport.pki import load_kit

    _setup_logging(logging.INFO)
    if _PROGRAM:  # before gRPC is imported: refused TLS handshakes in run.log (it takes over the process's fd 2)
        watch_refused_handshakes()
    if queue is not None:
        _serve_queue(kit, queue, job_file, resume, join_timeout, listen, he_context)
        return
    try:
        if job_file is None:
            raise ConfigError("medfed server needs --job JOB.yaml (one job), or --queue RUNS_DIR (a queue of jobs)")
        job = load_job(job_file)
        result = serve_job(job, load_kit(kit, role="server"), resume=resume, listen=listen, join_timeout=join_timeout,
                           he_context=he_context)
    except MedfedError as e:
        _fail(e)
        return
    _print_summary(result.run_dir, job)
    out.print(f"run folder: [bold]{result.run_dir}[/]  ({result.elapsed_s:.1f} s)")
    out.print(f"report:     [bold]{result.run_dir / 'report.html'}[/]")


def _serve_queue(kit: Path, runs_dir: Path, job_file: Optional[Path], resume: bool, join_timeout: Optional[float],
                 listen: Optional[str], he_context: Optional[Path]) -> None:
    """medfed server --queue RUNS_DIR (server/queue_server.py): until stopped (Ctrl-C)."""
    from medfed.server.queue_server import serve_queue
    from medfed.transport.pki import load_kit

    try:
        if job_file is not None or resume or join_timeout is not None:
            raise ConfigError("--queue serves the jobs admins submit (medfed submit): leave out --job, --resume and "
                              "--join-timeout (a job the server was running when it stopped is resumed by itself)")
        serve_queue(load_kit(kit, role="server"), runs_dir, listen=listen, he_context=he_context)
    except MedfedError as e:
        _fail(e)
    except KeyboardInterrupt:
        out.print("queue server stopped; a job it was running is resumed when it starts again")


@site_app.callback(invoke_without_command=True)
def site(
    ctx: typer.Context,
    kit: Optional[Path] = typer.Option(None, "--kit", help="This site's startup kit folder (from `medfed provision`)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="This site's data file: the job's data section with local paths (not needed for generated data)."
    ),
    give_up_after: float = typer.Option(
        3600.0, "--give-up-after", help="Seconds without contact with the server before the site stops."
    ),
    reconnect_max: Optional[float] = typer.Option(
        None, "--reconnect-max",
        help="Longest wait in seconds between two attempts to reach the server when it is away (default 1). "
             "The site is back within about 1.2 times this of the server listening.",
    ),
    he_context: Optional[Path] = typer.Option(
        None, "--he-context",
        help="For jobs with privacy.he: the consortium's secret CKKS context, he-secret.ctx from `medfed he-keys` "
             "(never given to the server).",
    ),
    max_epsilon: Optional[float] = typer.Option(
        None, "--max-epsilon", min=0.0,
        help="This site's privacy limit: refuse a job without differential privacy, or one whose epsilon would pass it.",
    ),
    bundle: Optional[Path] = typer.Option(
        None, "--bundle",
        help="The MONAI Bundle folder this site runs for a job with model: {bundle: ...} (the server never sends "
             "one: a bundle's configs are code); it must have the job's bundle_sha256.",
    ),
    policy: Optional[Path] = typer.Option(
        None, "--policy",
        help="This site's policy (YAML): the tasks, models, algorithms, privacy and peers it allows, what of its "
             "data summary it discloses, and approve: auto|manual; checked against the job before any data is read.",
    ),
    approval_timeout: Optional[float] = typer.Option(
        None, "--approval-timeout", callback=_join_seconds,
        help="Under approve: manual, seconds to wait for `medfed site approve` (default: the job's round_timeout).",
    ),
) -> None:
    """Take part in the consortium's job: connect out to the server, train and evaluate on local data.
    `medfed site approve|reject JOB_HASH --kit KIT`: decide on a job the site showed (policy approve: manual)."""
    if ctx.invoked_subcommand is not None:  # medfed site approve|reject: not the site itself
        return
    if kit is None:
        _fail(ConfigError("medfed site needs --kit: this site's startup kit folder (from `medfed provision`)"))
    import math

    from medfed.site.policy import gate_for
    from medfed.site.remote import RemoteSite
    from medfed.transport.grpc.client import RECONNECT_MAX, Connection, serve_tasks
    from medfed.transport.pki import load_kit

    _setup_logging(logging.INFO)
    try:
        if reconnect_max is not None and not (math.isfinite(reconnect_max) and reconnect_max > 0):
            raise ConfigError(f"--reconnect-max must be a number of seconds > 0, got {reconnect_max:g}")
        k = load_kit(kit, role="site")
        gate = gate_for(policy, k.path, k.name, approval_timeout) if policy is not None else None
        conn = Connection(f"{k.server_host}:{k.server_port}", k.ca_pem, k.cert_pem, k.key_pem, k.name,
                          reconnect_max=reconnect_max or RECONNECT_MAX)

        def fresh_site(run: Optional[str] = None) -> RemoteSite:
            """A site with no job's state (checks its data file and bundle first); ``run``: the
            queue server's run it is for, whose own site-state file it keeps."""
            r = RemoteSite(k.name, data, max_epsilon, kit=k, bundle=bundle, gate=gate, he_context=he_context)
            r.split_call = conn.split  # split learning's per-batch exchange (topology.kind: split)
            r.state_tag = f"-run{run}" if run is not None else ""
            return r

        remote = fresh_site()

        def new_run(run: str, _resumed: bool) -> None:  # a queue server's next job: nothing of the last one
            nonlocal remote
            remote = fresh_site(run)

        def setup(job: dict, job_id: str) -> tuple[dict, float]:
            try:
                summary, round_timeout = remote.setup(job, job_id)
            except MedfedError as e:  # the server is told why, without this site's folders
                logging.getLogger("medfed").error("site '%s': cannot take part in job %s: %s", k.name, job_id, e)
                try:
                    told = type(e)(remote.redact(str(e)))
                except TypeError:  # an error type built from parts (UnreadableFile)
                    told = DataError(remote.redact(str(e)))
                raise told from None
            conn.max_model = remote.max_model  # the largest model task accepted: sized on this site's own model
            if remote.max_exchange is not None:  # privacy.he: an encrypted sum to decrypt, model-sized
                conn.max_exchange = remote.max_exchange
            return summary, round_timeout

        try:
            serve_tasks(conn, setup, lambda hdr, blob: remote.answer(hdr, blob), give_up_after=give_up_after,
                        new_run=new_run, job_done=lambda: remote.finish())
            remote.finish()  # the job is done: its saved site state goes
        finally:
            conn.close()
    except MedfedError as e:
        _fail(e)
        return
    out.print(f"site [bold]{k.name}[/]: job finished")


app.add_typer(site_app, name="site")  # medfed site [--kit ...] | site approve | site reject
app.command("submit")(submit_job)  # server/commands.py: an admin's job to a queue server
app.add_typer(jobs_app, name="jobs")  # medfed jobs list | show ID | abort ID
app.command("he-keys")(he_keys)  # privacy/he/commands.py


_PROGRAM = False  # True in a process started as the medfed program, which owns its stderr (not app() called in-process)


def main() -> None:
    global _PROGRAM
    _PROGRAM = True
    app()


if __name__ == "__main__":
    main()
