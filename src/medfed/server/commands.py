"""The coordinator's commands. ``medfed provision CONSORTIUM.yaml [--out DIR] [--revoke
SITE]``: the consortium's certificate authority and a startup kit per participant
(transport/pki/provisioning.py), or a site's certificate revoked (revocation.py).
``medfed server --kit KIT --job JOB.yaml | --queue RUNS_DIR``: a job, or a queue of jobs,
served to the consortium's sites over mutual TLS (server/deploy.py, server/queue_server.py);
``medfed submit --kit ADMIN_KIT JOB.yaml`` and ``medfed jobs list | show ID | abort ID
--kit ADMIN_KIT``: an admin's calls to a queue server, over the admin service
(transport/grpc/admin.py), printed as tables.

``provision``, ``serve`` (``medfed server``), ``submit`` and the ``jobs_app`` group are
registered by cli.py. Each imports what it needs when it runs (certificates, gRPC), so
that ``medfed run`` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TypeVar

import typer
from rich.markup import escape

from medfed import terminal
from medfed.config import load_job
from medfed.core.errors import ConfigError, MedfedError
from medfed.terminal import fail, out, print_run, seconds, setup_logging

if TYPE_CHECKING:
    from medfed.server.queue import QueuedJob
    from medfed.transport.grpc.admin_client import AdminConnection

T = TypeVar("T")

jobs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="The jobs of a queue server (medfed server --queue): list, show, abort.")

_KIT_HELP = "An admin kit folder (from `medfed provision`: admin/)."
_STATUS_STYLE = {"queued": "cyan", "running": "bold yellow", "complete": "green", "failed": "red", "aborted": "magenta"}


def _ask(kit: Path, call: Callable[["AdminConnection"], T]) -> T:
    """``call`` on a connection to the queue server of the admin ``kit``; a medfed error is
    printed as one line and exits (terminal.fail)."""
    from medfed.transport.grpc.admin_client import AdminConnection
    from medfed.transport.pki import load_kit

    try:
        with AdminConnection(load_kit(kit, role="admin")) as conn:
            return call(conn)
    except MedfedError as e:
        fail(e)


def _status(job: QueuedJob) -> str:
    return f"[{_STATUS_STYLE.get(job.status.value, 'white')}]{job.status.value}[/]"


def _table(jobs: list[QueuedJob]):
    from rich.table import Table

    table = Table(title="jobs of the queue server")
    for col in ("id", "name", "status", "round", "submitted", "by", "run folder"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j.id, escape(j.name), _status(j), f"{j.round}/{j.rounds}", j.submitted, escape(j.submitted_by),
                      escape(j.run_dir))
    return table


def _details(j: QueuedJob) -> None:
    from rich.table import Table

    table = Table(show_header=False, title=f"job {j.id}")
    rows = [("name", escape(j.name)), ("status", _status(j)), ("round", f"{j.round} of {j.rounds}"),
            ("run folder", escape(j.run_dir)), ("submitted", f"{j.submitted} by {escape(j.submitted_by)} "
                                                            f"({escape(j.source)})"),
            ("started", j.started or "-"), ("finished", j.finished or "-")]
    if j.resumed:
        rows.append(("resumed", "after a restart of the server, from its last saved round"))
    if j.error:
        rows.append(("error", escape(j.error)))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


def submit(
    job_file: Path = typer.Argument(..., help="Job YAML: the same file `medfed server --job` runs."),
    kit: Path = typer.Option(..., "--kit", help=_KIT_HELP),
) -> None:
    """Submit a job to the queue server: checked as `medfed validate` checks it, then queued."""
    job = _ask(kit, lambda conn: conn.submit(job_file))
    out.print(f"[green]queued[/]: job [bold]{job.id}[/] ('{escape(job.name)}', {job.rounds} rounds); its run folder "
              f"will be {escape(job.run_dir)}", highlight=False)


@jobs_app.command("list")
def list_jobs(kit: Path = typer.Option(..., "--kit", help=_KIT_HELP)) -> None:
    """Every job of the queue, in the order submitted."""
    jobs = _ask(kit, lambda conn: conn.list())
    out.print(_table(jobs))


@jobs_app.command("show")
def show(job_id: str = typer.Argument(..., help="The job's id (see medfed jobs list)."),
         kit: Path = typer.Option(..., "--kit", help=_KIT_HELP)) -> None:
    """One job: its status, round, run folder and error."""
    job = _ask(kit, lambda conn: conn.show(job_id))
    _details(job)


@jobs_app.command("abort")
def abort(job_id: str = typer.Argument(..., help="The job's id (see medfed jobs list)."),
          kit: Path = typer.Option(..., "--kit", help=_KIT_HELP)) -> None:
    """Abort a job: a queued one is dropped; the running one stops at its next round boundary, its run folder kept."""
    job = _ask(kit, lambda conn: conn.abort(job_id))
    if job.status.value == "aborted":
        out.print(f"job [bold]{job.id}[/] aborted: it will not run", highlight=False)
    else:
        out.print(f"job [bold]{job.id}[/] is running: it stops at its next round boundary (its run folder is kept)",
                  highlight=False)


def serve(
    kit: Path = typer.Option(..., "--kit", help="The server's startup kit folder (from `medfed provision`)."),
    job_file: Optional[Path] = typer.Option(None, "--job", help="Job YAML: the same file a simulation runs."),
    queue: Optional[Path] = typer.Option(
        None, "--queue", help="Instead of --job: serve a queue of jobs, kept in this runs folder, one after another "
                              "(`medfed submit`, `medfed jobs` with an admin kit); runs until stopped."),
    resume: bool = typer.Option(False, "--resume", help="Continue a run that was stopped, after its last completed round."),
    listen: Optional[str] = typer.Option(None, "--listen", help="Address to bind, host:port (default 0.0.0.0:<kit port>)."),
    join_timeout: Optional[float] = typer.Option(
        None, "--join-timeout", callback=seconds,
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

    setup_logging(logging.INFO)
    if terminal.PROGRAM:  # before gRPC is imported: refused TLS handshakes in run.log (it takes over the process's fd 2)
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
        fail(e)
        return
    print_run(result.run_dir, job, result.elapsed_s)


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
        fail(e)
    except KeyboardInterrupt:
        out.print("queue server stopped; a job it was running is resumed when it starts again")


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
        fail(e)
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
        fail(e)
        return
    out.print(f"revoked: site [bold]{escape(mine.name)}[/] (serial {mine.serial:x}, {mine.when:%Y-%m-%d %H:%M} UTC); "
              f"{len(listed)} revoked in all: {escape(', '.join(r.name for r in listed))}", highlight=False)
    out.print(f"Install [bold]{escape(str(server_copy))}[/] in the running server's kit folder (same file name): the "
              "server refuses the site at its next call, without a restart.", highlight=False)
