"""``medfed he-keys --job JOB OUT``: the consortium's CKKS keys for a job with ``privacy.he``.

Writes ``he-secret.ctx`` (the parameters, public key and secret key: for every site,
``medfed site --he-context``, never for the server) and ``he-public.ctx`` (the parameters
and public key: for the server, ``medfed server --he-context``), both readable by their
owner only, and prints their fingerprint, which every site checks against the server's
before its first encrypted round. The keys are made where this command runs: run it on a
machine the server's operator does not control (a site's, or the consortium's offline
machine that keeps the CA) and send the secret file to the sites over a secure channel.
Imported by cli.py only; needs the ``he`` extra when run.
"""

from __future__ import annotations

from pathlib import Path

import typer


def he_keys(
    out: Path = typer.Argument(..., help="Folder to write he-secret.ctx and he-public.ctx into (never overwritten)."),
    job_file: Path = typer.Option(..., "--job", help="The job YAML whose privacy.he section sets the parameters."),
) -> None:
    """Make the consortium's CKKS keys for a job with privacy.he: he-secret.ctx for the sites, he-public.ctx for
    the server."""
    from rich.console import Console
    from rich.markup import escape

    from medfed.config import load_job
    from medfed.core.errors import ConfigError, MedfedError

    out_console, err = Console(), Console(stderr=True)
    try:
        job = load_job(job_file)
        if job.privacy.he is None:
            raise ConfigError(f"{job_file}: the job has no privacy.he section; add one to aggregate under "
                              "homomorphic encryption")
        from medfed.privacy.he.ckks import write_keys  # ConfigError naming the extra when TenSEAL is missing

        secret, public, fp = write_keys(out, job.privacy.he)
    except MedfedError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out_console.print(f"sites (secret, send over a secure channel): [bold]{escape(str(secret))}[/]", highlight=False)
    out_console.print(f"server (public):                            [bold]{escape(str(public))}[/]", highlight=False)
    out_console.print(f"fingerprint: {fp}", highlight=False)
