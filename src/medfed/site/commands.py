"""``medfed site approve | reject JOB_HASH --kit KIT``: a site operator's decision on a job
that the site showed under ``approve: manual`` (site/policy.py ``Gate``), remembered per job
hash in the site's state folder and written to its audit log (site/approvals.py).

``site_app`` is the ``medfed site`` group: its callback (``site``, below) runs the site
itself, connecting out to the server and serving its tasks (site/remote.py,
transport/grpc/client.py), so ``medfed site --kit KIT ...`` works as it always has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from medfed.core.errors import ConfigError, DataError, MedfedError
from medfed.terminal import fail, out, seconds, setup_logging

site_app = typer.Typer(add_completion=False)  # its help: the callback's docstring (cli.py ``site``)

_KIT_HELP = "This site's startup kit folder: its state folder (kit/state) holds the approvals and the audit log."


def _decide(job_hash: str, kit: Path, approve: bool, reason: str) -> None:
    from rich.markup import escape

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
        fail(e)
        return
    what = "[green]approved[/]" if approve else "[red]rejected[/]"
    then = ("A site waiting for it goes on at once; a stopped one, when started again." if approve
            else "The site declines it, telling the server why.")
    out.print(f"job '{escape(printable(rec.job_name))}' (hash {rec.job_hash}) {what} at site {k.name}; "
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
        None, "--approval-timeout", callback=seconds,
        help="Under approve: manual, seconds to wait for `medfed site approve` (default: the job's round_timeout).",
    ),
) -> None:
    """Take part in the consortium's job: connect out to the server, train and evaluate on local data.
    `medfed site approve|reject JOB_HASH --kit KIT`: decide on a job the site showed (policy approve: manual)."""
    if ctx.invoked_subcommand is not None:  # medfed site approve|reject: not the site itself
        return
    if kit is None:
        fail(ConfigError("medfed site needs --kit: this site's startup kit folder (from `medfed provision`)"))
    import math

    from medfed.site.policy import gate_for
    from medfed.site.remote import RemoteSite
    from medfed.transport.grpc.client import RECONNECT_MAX, Connection, serve_tasks
    from medfed.transport.pki import load_kit

    setup_logging(logging.INFO)
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
        fail(e)
        return
    out.print(f"site [bold]{k.name}[/]: job finished")
