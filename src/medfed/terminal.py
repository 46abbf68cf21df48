"""What medfed's commands share on the terminal (cli.py and the command modules it
registers: server/commands.py, site/commands.py): the two
consoles, an error a user can cause printed as one clear line (no traceback) with exit
status 2 (a bad job, data, model, run folder or network) or 1 (a run that failed on the
way), medfed's log on the terminal, a finished run's summary, and options in seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from medfed.core.errors import ConfigError, DataError, ModelError, NetworkError, RunDirError

if TYPE_CHECKING:
    from medfed.config import Job

out = Console()
err = Console(stderr=True)

USER_ERRORS = (ConfigError, DataError, ModelError, RunDirError, NetworkError)

# True in a process started as the medfed program (cli.main), which owns its stderr; False
# where a command is called in-process (app() in a test or a notebook)
PROGRAM = False


def fail(e: Exception) -> NoReturn:
    """Print ``e`` as one line and exit: 2 for an error a user caused, else 1."""
    # the message may hold brackets (field paths, file names): printed as it is, not as markup
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, USER_ERRORS) else 1)


def setup_logging(terminal_level: int = logging.WARNING) -> None:
    """medfed's log on the terminal: warnings for a simulation (round-by-round INFO goes
    to run.log only); everything for a server or site process, whose operator watches it."""
    logger = logging.getLogger("medfed")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        h = RichHandler(console=err, show_path=False, show_time=terminal_level <= logging.INFO)
        h.setLevel(terminal_level)
        logger.addHandler(h)


def print_run(run_dir: Path, job: "Job", elapsed_s: float) -> None:
    """A finished run's table of the arms by site (and its contribution table, if any),
    then where its folder and report are."""
    from medfed.tracking.contribution import contribution_table, read_contribution
    from medfed.tracking.metrics import read_metrics
    from medfed.tracking.tables import summary_table

    out.print(summary_table(read_metrics(run_dir / "metrics.jsonl"), job.task.monitor, job.held_out))
    contribution = read_contribution(run_dir)
    if contribution is not None:
        out.print(contribution_table(contribution))
    out.print(f"run folder: [bold]{run_dir}[/]  ({elapsed_s:.1f} s)")
    out.print(f"report:     [bold]{run_dir / 'report.html'}[/]")


def seconds(value: Optional[float]) -> Optional[float]:
    """An option in seconds (``--join-timeout``, ``--approval-timeout``): > 0 and at most
    the longest round timeout a job may set (a week); 0 would silently mean the default,
    and inf cannot be waited on."""
    from medfed.config import MAX_ROUND_TIMEOUT

    if value is not None and not 0 < value <= MAX_ROUND_TIMEOUT:
        raise typer.BadParameter(f"must be > 0 and at most {MAX_ROUND_TIMEOUT:g} seconds (a week), got {value:g}")
    return value
