"""``medfed provision CONSORTIUM.yaml [--out DIR] [--revoke SITE]``: the consortium's
certificate authority and a startup kit per participant (provisioning.py), or a site's
certificate revoked (revocation.py), printed as a table. cli.py registers the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from medfed.core.errors import MedfedError
from medfed.terminal import fail, out


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
