"""``medfed site approve | reject JOB_HASH --kit KIT``: a site operator's decision on a job
that the site showed under ``approve: manual`` (site/policy.py ``Gate``), remembered per job
hash in the site's state folder and written to its audit log (site/approvals.py).

``site_app`` is the ``medfed site`` group: its callback (in cli.py) runs the site itself,
so ``medfed site --kit KIT ...`` works as it always has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

site_app = typer.Typer(add_completion=False)  # its help: the callback's docstring (cli.py ``site``)

_KIT_HELP = "This site's startup kit folder: its state folder (kit/state) holds the approvals and the audit log."


def _fail(e: Exception) -> None:
    """As cli.py prints an error a user caused (this module is imported by it): one line, exit 2."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _decide(job_hash: str, kit: Path, approve: bool, reason: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    from medfed.core.errors import MedfedError
    from medfed.core.text import printable
    from medfed.site.approvals import ApprovalStore, AuditLog, Decision, Status, state_folder
    from medfed.transport.pki import load_kit

    verb = "approve" if approve else "reject"
    try:
        k = load_kit(kit, role="site")
        folder = state_folder(k.path)
        audit = AuditLog(folder, k.name)
        store = ApprovalStore(folder)
        try:
            rec = store.decide(job_hash, Status.APPROVED if approve else Status.REJECTED, reason)
        except MedfedError as e:  # bad input: logged too, then refused
            audit.record(Decision.INVALID, "operator", f"{verb} {job_hash.strip()[:80]!r} refused: {e}")
            raise
        audit.record(Decision.APPROVED if approve else Decision.REJECTED, "operator", reason, rec.job_hash,
                     rec.job_id, rec.job_name)
    except MedfedError as e:
        _fail(e)
        return
    what = "[green]approved[/]" if approve else "[red]rejected[/]"
    then = ("A site waiting for it goes on at once; a stopped one, when started again." if approve
            else "The site declines it, telling the server why.")
    Console().print(f"job '{escape(printable(rec.job_name))}' (hash {rec.job_hash}) {what} at site {k.name}; "
                    f"remembered for this hash. {then}", highlight=False)


@site_app.command()
def approve(
    job_hash: str = typer.Argument(..., help="The job hash the site printed (all 64 hex digits, or the first 16+)."),
    kit: Path = typer.Option(..., "--kit", help=_KIT_HELP),
) -> None:
    """Let a job this site showed (policy approve: manual) run on this site's data."""
    _decide(job_hash, kit, True, "")


@site_app.command()
def reject(
    job_hash: str = typer.Argument(..., help="The job hash the site printed (all 64 hex digits, or the first 16+)."),
    kit: Path = typer.Option(..., "--kit", help=_KIT_HELP),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why: the server's log shows it."),
) -> None:
    """Refuse a job this site showed (policy approve: manual); the site tells the server why."""
    _decide(job_hash, kit, False, reason or "")
