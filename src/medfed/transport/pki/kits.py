"""A participant's startup kit: its files, written by provisioning, and :func:`load_kit`,
which reads a kit folder and refuses it, naming the file, what is wrong and what to do."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from pydantic import Field, ValidationError

from medfed.config import describe_error
from medfed.core.errors import ConfigError
from medfed.core.schema import Frozen
from medfed.transport.pki.certificates import (
    common_name,
    format_date,
    issue_certificate,
    same_public_key,
    utc_now,
)
from medfed.transport.pki.consortium import Consortium

KIT_VERSION = 1
KIT_FILES = ("kit.json", "ca.crt", "participant.crt", "participant.key")

Role = Literal["server", "site", "admin"]


# --------------------------------------------------------------------------- writing a kit


def build_kit(
    out: Path, name: str, role: str, cons: Consortium, ca_cert_pem: bytes, ca_key_pem: bytes, not_after: dt.datetime
) -> None:
    """Write one kit in ``.<name>.partial`` and rename it to ``<name>``: never half a kit."""
    cert_pem, key_pem = issue_certificate(
        ca_cert_pem, ca_key_pem, name, role,
        host=cons.server.host if role == "server" else None, not_after=not_after, consortium=cons.name,
    )
    tmp = out / f".{name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    make_private_dir(tmp)
    info = {
        "consortium": cons.name,
        "name": name,
        "role": role,
        "server_host": cons.server.host,
        "server_port": cons.server.port,
        "medfed_kit_version": KIT_VERSION,
    }
    write_atomic(tmp / "participant.key", key_pem, 0o600)
    write_atomic(tmp / "participant.crt", cert_pem, 0o644)
    write_atomic(tmp / "ca.crt", ca_cert_pem, 0o644)
    write_atomic(tmp / "kit.json", (json.dumps(info, indent=2) + "\n").encode(), 0o644)
    write_atomic(tmp / "start.sh", _start_script(role, cons.name), 0o755)
    write_atomic(tmp / "README.txt", _readme(role, name, cons), 0o644)
    os.rename(tmp, out / name)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` with ``mode``: a temp file in the same folder, then a rename,
    so a reader never sees half a file. The temp file is created with ``mode`` (never briefly
    more readable) and chmod-ed to it exactly (the umask may have narrowed it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover could carry a wider mode; O_EXCL below needs it gone
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_private_dir(path: Path) -> None:
    """Create folder ``path`` readable by its owner only (mode 0700)."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # exactly 0700 whatever the umask


def _start_script(role: str, consortium: str) -> bytes:
    if role == "server":
        cmd = 'medfed server --kit "$(dirname "$0")" --job "${1:?usage: start.sh JOB.yaml}"'
    elif role == "admin":  # the queue server's job list; `medfed submit --kit KIT JOB.yaml` submits
        cmd = 'medfed jobs list --kit "$(dirname "$0")"'
    else:
        cmd = 'medfed site --kit "$(dirname "$0")" --data "${1:?usage: start.sh SITE_DATA.yaml}"'
    return (
        "#!/bin/sh\n"
        f"# Starts this {role} of the '{consortium}' consortium. Written by `medfed provision`.\n"
        f"exec {cmd}\n"
    ).encode()


def _readme(role: str, name: str, consortium: Consortium) -> bytes:
    who = "the server" if role == "server" else f"admin '{name}'" if role == "admin" else f"site '{name}'"
    start = {"server": "./start.sh JOB.yaml", "admin": "./start.sh (lists the queue server's jobs); submit with "
             "medfed submit --kit THIS_FOLDER JOB.yaml"}.get(role, "./start.sh SITE_DATA.yaml")
    text = f"""\
medfed startup kit of {who}, consortium '{consortium.name}'
server: {consortium.server.host}:{consortium.server.port}

  ca.crt           the consortium's CA certificate: only peers it signed are trusted
  participant.crt  this participant's certificate
  participant.key  this participant's PRIVATE key: keep it private, never send it
                   anywhere, keep its mode 0600 (chmod 600 participant.key)
  kit.json         who this kit belongs to and where the server is
  start.sh         starts this participant

To start: {start}
Keep this folder where only the account that runs medfed can read it. If it is lost or
leaked, ask the consortium's coordinator for a new kit.
"""
    return text.encode()


# --------------------------------------------------------------------------- reading a kit


@dataclass(frozen=True)
class Kit:
    """A participant's startup kit, read and checked by :func:`load_kit`. PEMs are bytes."""

    path: Path
    name: str
    role: str
    consortium: str
    server_host: str
    server_port: int
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


class _KitInfo(Frozen):
    consortium: str
    name: str
    role: Role
    server_host: str
    server_port: int = Field(ge=1, le=65535)
    medfed_kit_version: int


def load_kit(path: str | Path, role: str | None = None) -> Kit:
    """Read a kit folder and check it: files present, kit.json valid, the expected ``role``
    ("server", "site" or "admin"; None: any), a private key only its owner can read (POSIX), a
    certificate signed by the kit's CA, naming this participant, valid now, matching the key.
    Raises ConfigError naming the folder and file."""
    folder = Path(path)
    where = f"kit folder '{folder}'"
    if not folder.is_dir():
        raise ConfigError(f"{where} not found (it is made by `medfed provision`; give the folder, not a file in it)")
    for f in KIT_FILES:
        if not (folder / f).is_file():
            raise ConfigError(f"{where} has no {f}; copy the whole kit folder again, as the coordinator sent it")

    try:
        raw = json.loads((folder / "kit.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: kit.json is not valid JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("medfed_kit_version"), int) and raw["medfed_kit_version"] > KIT_VERSION:
        raise ConfigError(
            f"{where}: kit.json has medfed_kit_version {raw['medfed_kit_version']}, this medfed reads version "
            f"{KIT_VERSION}; upgrade medfed"
        )
    try:
        info = _KitInfo.model_validate(raw)
    except ValidationError as e:
        lines = [describe_error(err) for err in e.errors()]
        raise ConfigError(f"{where}: kit.json is invalid\n  " + "\n  ".join(lines)) from None
    if info.medfed_kit_version != KIT_VERSION:
        raise ConfigError(f"{where}: kit.json medfed_kit_version must be {KIT_VERSION}, got {info.medfed_kit_version}")

    if role is not None and info.role != role:
        what = {"server": "the server kit", "admin": f"the kit of admin '{info.name}'"}.get(
            info.role, f"the kit of site '{info.name}'")
        need = {"server": "the server kit", "admin": "an admin kit"}.get(role, "a site kit")
        command = "submit` / `medfed jobs" if role == "admin" else role
        raise ConfigError(f"{where} is {what} (a {info.role} kit); `medfed {command}` needs {need}")

    key_file = folder / "participant.key"
    if os.name == "posix":
        mode = stat.S_IMODE(key_file.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{where}: participant.key is readable by group or others (mode {mode:04o}); the private key must "
                f"stay private: run `chmod 600 {key_file}`"
            )

    ca_pem = (folder / "ca.crt").read_bytes()
    cert_pem = (folder / "participant.crt").read_bytes()
    key_pem = key_file.read_bytes()
    ca = _load_cert(ca_pem, folder / "ca.crt")
    cert = _load_cert(cert_pem, folder / "participant.crt")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: participant.key is not an unencrypted PEM private key ({e})") from None

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{where}: participant.crt was not signed by the kit's CA (ca.crt): the files come from different "
            "consortiums or provisioning folders; ask the coordinator for a fresh kit"
        ) from None

    expected_cn = info.server_host if info.role == "server" else info.name
    cn = common_name(cert_pem)
    if cn != expected_cn:
        field_ = "server_host" if info.role == "server" else "name"
        raise ConfigError(
            f"{where}: participant.crt is issued to {cn!r} but kit.json {field_} is {expected_cn!r}; the kit was "
            "edited or mixed with another one; ask the coordinator for a fresh kit"
        )

    now = utc_now()
    for label, c, file in (("the CA certificate", ca, "ca.crt"), ("the certificate", cert, "participant.crt")):
        start, end = c.not_valid_before_utc, c.not_valid_after_utc
        if now < start:
            raise ConfigError(
                f"{where}: {label} ({file}) is not valid yet: valid from {format_date(start)} to {format_date(end)}, now is "
                f"{format_date(now)}; check this machine's clock"
            )
        if now >= end:
            raise ConfigError(
                f"{where}: {label} ({file}) expired on {format_date(end)} (valid from {format_date(start)}); ask the "
                "coordinator for a new kit (they delete its folder and re-run `medfed provision`)"
            )

    if not same_public_key(key.public_key(), cert.public_key()):
        raise ConfigError(
            f"{where}: participant.key is not the key of participant.crt; copy the whole kit folder again"
        )
    return Kit(
        path=folder, name=info.name, role=info.role, consortium=info.consortium, server_host=info.server_host,
        server_port=info.server_port, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem,
    )


def _load_cert(pem: bytes, file: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ConfigError(f"kit folder '{file.parent}': {file.name} is not a PEM certificate ({e})") from None
