"""``medfed submit --kit ADMIN_KIT JOB.yaml`` and ``medfed jobs list | show ID | abort ID
--kit ADMIN_KIT``: an admin's calls to a queue server (``medfed server --queue``), over the
admin service (transport/grpc/admin.py), printed as tables.

``jobs_app`` is the ``medfed jobs`` group and ``submit`` the ``medfed submit`` command;
cli.py registers both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from medfed.server.queue import QueuedJob
    from medfed.transport.grpc.admin_client import AdminConnection

T = TypeVar("T")

jobs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="The jobs of a queue server (medfed server --queue): list, show, abort.")

_KIT_HELP = "An admin kit folder (from `medfed provision`: admin/)."
_STATUS_STYLE = {"queued": "cyan", "running": "bold yellow", "complete": "green", "failed": "red", "aborted": "magenta"}

out = Console()


def _fail(e: Exception) -> None:
    """As cli.py prints an error a user caused: one line; exit 2 for a bad job or kit, else 1."""
    from medfed.core.errors import ConfigError, NetworkError

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, (ConfigError, NetworkError)) else 1)


def _ask(kit: Path, call: Callable[["AdminConnection"], T]) -> T:
    """``call`` on a connection to the queue server of the admin ``kit``; a medfed error is
    printed as one line and exits (:func:`_fail`)."""
    from medfed.core.errors import MedfedError
    from medfed.transport.grpc.admin_client import AdminConnection
    from medfed.transport.pki import load_kit

    try:
        with AdminConnection(load_kit(kit, role="admin")) as conn:
            return call(conn)
    except MedfedError as e:
        _fail(e)
        raise  # not reached: _fail exits


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
