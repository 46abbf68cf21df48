"""Provisioning (``medfed provision``): the output folder's CA, a kit for every participant
that has none yet, and the record of what was issued (``consortium.json``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from medfed.core.errors import ConfigError
from medfed.transport.pki.certificates import (
    CA_DAYS,
    create_ca,
    fingerprint,
    format_date,
    same_public_key,
    utc_now,
)
from medfed.transport.pki.consortium import (
    CA_DIR,
    LEDGER,
    SERVER_NAME,
    Consortium,
    load_consortium,
)
from medfed.transport.pki.kits import build_kit, make_private_dir, write_atomic


@dataclass(frozen=True)
class IssuedKit:
    """One kit in the output folder: who, where, and whether this run created it."""

    name: str
    role: str
    path: Path
    status: Literal["created", "kept"]
    serial: str  # hex
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    in_consortium_file: bool = True  # False: a site removed from the file; its kit is kept, not revoked

    @property
    def expired(self) -> bool:
        return self.not_after <= utc_now()


@dataclass(frozen=True)
class ProvisionResult:
    """What ``provision`` did: the output folder, whether it created the CA, every kit."""

    out_dir: Path
    consortium: Consortium
    ca_created: bool
    kits: list[IssuedKit]
    notes: list[str] = field(default_factory=list)

    @property
    def created(self) -> list[str]:
        return [k.name for k in self.kits if k.status == "created"]

    @property
    def kept(self) -> list[str]:
        return [k.name for k in self.kits if k.status == "kept"]

    @property
    def removed(self) -> list[str]:
        """Sites whose kit is kept but that are no longer in the consortium file."""
        return [k.name for k in self.kits if not k.in_consortium_file]


def default_out_dir(consortium_path: str | Path, consortium: Consortium) -> Path:
    """``<name>-kits`` next to the consortium file."""
    return Path(consortium_path).parent / f"{consortium.name}-kits"


def provision(consortium_path: str | Path, out_dir: str | Path | None = None) -> ProvisionResult:
    """Create the CA (if missing) and a kit for every participant that has none yet.

    ``out_dir`` defaults to ``<name>-kits`` next to the consortium file. Existing kits are
    left byte-for-byte untouched. Raises ConfigError for a bad consortium file, or when the
    consortium name or server address differ from those the folder's kits were issued for.
    """
    consortium_path = Path(consortium_path)
    cons = load_consortium(consortium_path)
    out = Path(out_dir) if out_dir is not None else default_out_dir(consortium_path, cons)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder '{out}' is a file; give another --out")
    out.mkdir(parents=True, exist_ok=True)

    _check_ledger(out, cons, consortium_path)
    ca_cert_pem, ca_key_pem, ca_created = _ca(out, cons)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    if ca_created:
        # Record the consortium at once: a run interrupted after this still pins the
        # folder to this name and server address.
        _write_ledger(out, cons, ca_cert_pem, [])

    # A kit must not outlive the CA that vouches for it.
    not_after = min(utc_now() + dt.timedelta(days=cons.validity_days), ca_cert.not_valid_after_utc)
    kits: list[IssuedKit] = []
    participants: list[tuple[str, str]] = ([(SERVER_NAME, "server")] + [(s, "site") for s in cons.sites]
                                           + [(a, "admin") for a in cons.admin_kits])
    for name, role in participants:
        folder = out / name
        if folder.exists():
            kits.append(_existing_kit(folder, name, role, ca_cert, status="kept"))
            continue
        build_kit(out, name, role, cons, ca_cert_pem, ca_key_pem, not_after)
        kits.append(_existing_kit(folder, name, role, ca_cert, status="created"))

    notes: list[str] = []
    listed = {n for n, _ in participants}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in listed and p.name != CA_DIR):
        if folder.name.startswith(".") or not (folder / "kit.json").is_file():
            continue
        role = _kit_role(folder)
        kit = _existing_kit(folder, folder.name, role, ca_cert, status="kept", in_file=False)
        kits.append(kit)
        notes.append(
            f"{role} '{kit.name}' is no longer in {consortium_path.name}; its kit in '{folder}' is kept and its "
            f"certificate is NOT revoked: it stays valid until {format_date(kit.not_after)}"
        )

    _write_ledger(out, cons, ca_cert_pem, kits)
    return ProvisionResult(out_dir=out, consortium=cons, ca_created=ca_created, kits=kits, notes=notes)


def _check_ledger(out: Path, cons: Consortium, consortium_path: Path) -> None:
    """Refuse to add kits to a folder provisioned for another consortium or server address:
    the kits already handed out name that server, and a new server certificate would not match them."""
    ledger = out / LEDGER
    if not ledger.is_file():
        return
    try:
        rec = json.loads(ledger.read_text(encoding="utf-8"))
        recorded = {
            "name": rec["consortium"],
            "server.host": rec["server"]["host"],
            "server.port": rec["server"]["port"],
        }
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"'{ledger}' is not a consortium record medfed can read ({e}); restore it, or provision into a new "
            "output folder (--out)"
        ) from None
    now = {"name": cons.name, "server.host": cons.server.host, "server.port": cons.server.port}
    for key, was in recorded.items():
        if now[key] != was:
            raise ConfigError(
                f"{consortium_path}: {key} is {now[key]!r}, but the kits in '{out}' were issued for {was!r} "
                f"(recorded in {LEDGER}). Changing it would change the server certificate and every kit's "
                f"server address, so the kits already handed out would stop working. Provision into a new "
                f"output folder (--out) to start over, or set {key} back to {was!r}."
            )


def _ca(out: Path, cons: Consortium) -> tuple[bytes, bytes, bool]:
    """The folder's CA (cert PEM, key PEM, created?): read it, or create it when missing."""
    ca_dir = out / CA_DIR
    crt, key = ca_dir / "ca.crt", ca_dir / "ca.key"
    if ca_dir.exists():
        if not (crt.is_file() and key.is_file()):
            missing = "ca.crt" if not crt.is_file() else "ca.key"
            raise ConfigError(
                f"CA folder '{ca_dir}' has no {missing}; restore it from your backup (without the CA no kit can be "
                "added), or provision into a new output folder (--out)"
            )
        cert_pem, key_pem = crt.read_bytes(), key.read_bytes()
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            ca_key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as e:
            raise ConfigError(f"CA folder '{ca_dir}': cannot read the CA ({e}); restore it from your backup") from None
        if not same_public_key(cert.public_key(), ca_key.public_key()):
            raise ConfigError(f"CA folder '{ca_dir}': ca.key is not the key of ca.crt; restore both from your backup")
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if orgs and orgs[0].value != cons.name:
            raise ConfigError(
                f"CA folder '{ca_dir}' is the CA of consortium '{orgs[0].value}', not '{cons.name}'; "
                "provision into a new output folder (--out)"
            )
        if cert.not_valid_after_utc <= utc_now():
            raise ConfigError(
                f"CA certificate '{crt}' expired on {format_date(cert.not_valid_after_utc)}; no kit can be issued with it. "
                "Provision the whole consortium again into a new output folder (--out)"
            )
        return cert_pem, key_pem, False
    if (out / LEDGER).is_file():
        # Kits were issued here: a new CA would not vouch for them.
        raise ConfigError(
            f"'{out}' holds kits ({LEDGER}) but its CA folder '{ca_dir}' is missing; restore ca/ from your backup, "
            "or provision into a new output folder (--out) and hand out every kit again"
        )

    cert_pem, key_pem = create_ca(cons.name, CA_DAYS)
    # Built beside its final place and renamed: an interrupted run leaves no CA without its key.
    tmp = out / f".{CA_DIR}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_private_dir(tmp)
    write_atomic(tmp / "ca.key", key_pem, 0o600)
    write_atomic(tmp / "ca.crt", cert_pem, 0o644)
    os.rename(tmp, ca_dir)
    return cert_pem, key_pem, True


def _kit_role(folder: Path) -> str:
    """The role kit.json of an unlisted kit folder gives ("admin" or, by default, "site")."""
    try:
        info = json.loads((folder / "kit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "site"
    return "admin" if isinstance(info, dict) and info.get("role") == "admin" else "site"


def _existing_kit(
    folder: Path, name: str, role: str, ca_cert: x509.Certificate, status: Literal["created", "kept"],
    in_file: bool = True,
) -> IssuedKit:
    """Describe a kit folder of the output, checking it is a kit of this CA for this participant."""
    if not folder.is_dir() or not (folder / "kit.json").is_file() or not (folder / "participant.crt").is_file():
        raise ConfigError(
            f"'{folder}' exists but is not a medfed kit (no kit.json or participant.crt); move it away so that "
            f"the kit of '{name}' can be created there"
        )
    try:
        info = json.loads((folder / "kit.json").read_text(encoding="utf-8"))
        cert = x509.load_pem_x509_certificate((folder / "participant.crt").read_bytes())
    except ValueError as e:
        raise ConfigError(f"kit folder '{folder}': cannot read kit.json or participant.crt ({e})") from None
    if not isinstance(info, dict) or info.get("name") != name or info.get("role") != role:
        got = (info.get("name"), info.get("role")) if isinstance(info, dict) else info
        raise ConfigError(
            f"kit folder '{folder}': kit.json says (name, role) = {got!r}, expected ({name!r}, {role!r}); "
            "move the folder away and run provision again"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"kit folder '{folder}': participant.crt was not issued by this output folder's CA; move the folder "
            "away and run provision again"
        ) from None
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return IssuedKit(
        name=name, role=role, path=folder, status=status, serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, fingerprint=fingerprint(pem),
        in_consortium_file=in_file,
    )


def _write_ledger(out: Path, cons: Consortium, ca_cert_pem: bytes, kits: list[IssuedKit]) -> None:
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    record = {
        "consortium": cons.name,
        "server": {"host": cons.server.host, "port": cons.server.port},
        "ca": {"fingerprint": fingerprint(ca_cert_pem), "not_after": ca.not_valid_after_utc.isoformat()},
        "participants": [
            {
                "name": k.name,
                "role": k.role,
                "serial": k.serial,
                "not_before": k.not_before.isoformat(),
                "not_after": k.not_after.isoformat(),
                "sha256": k.fingerprint,
                "in_consortium_file": k.in_consortium_file,
            }
            for k in kits
        ],
    }
    write_atomic(out / LEDGER, (json.dumps(record, indent=2) + "\n").encode(), 0o644)
