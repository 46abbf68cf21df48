"""The consortium's certificate authority and its startup kits (``medfed provision``).

One person, the consortium's coordinator, runs ``medfed provision`` on a consortium file.
It creates a certificate authority (CA) and one *kit* per participant: the server and each
site. A kit is a folder holding the CA certificate, the participant's certificate and
private key, a ``kit.json`` that says who it is and where the server is, and a
``start.sh``. The kits are copied to the participants; ``medfed server --kit`` and
``medfed site --kit`` read them with :func:`load_kit` and talk over mutual TLS, where each
side checks that the other's certificate was issued by the consortium's CA.

Keys are ECDSA P-256, signatures SHA-256. Private keys are written unencrypted (PKCS#8
PEM) with mode 0600, in folders with mode 0700: a kit is protected by where it is kept.

Layout of the output folder::

    ca/ca.crt  ca/ca.key        the CA (keep ca/ offline: it can issue new kits)
    consortium.json             what was issued: per participant name, role, serial, expiry
    server/                     the server's kit
    <site>/                     one kit per site

Re-running on the same folder reuses the CA and only creates the kits that are missing;
existing kits are never rewritten. To reissue a kit (lost, expired), delete its folder and
re-run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import Field, ValidationError, field_validator

from medfed.config import SiteName, describe_error, read_yaml, unique_names
from medfed.core.errors import ConfigError
from medfed.core.schema import Count, Frozen

KIT_VERSION = 1
SERVER_NAME = "server"  # the server kit's name and folder
CA_DIR = "ca"
LEDGER = "consortium.json"
KIT_FILES = ("kit.json", "ca.crt", "participant.crt", "participant.key")
# Kit folders sit next to these in the output folder, so no site may take their names.
RESERVED_NAMES = {SERVER_NAME, CA_DIR, LEDGER}
CA_DAYS = 3650  # the CA outlives the kits so that sites added later still fit under it
CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is back-dated by this much
SITE_URI_PREFIX = "urn:medfed:site:"

Role = Literal["server", "site"]

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# --------------------------------------------------------------------------- consortium file


class ServerAddress(Frozen):
    """Where the sites reach the server: a DNS name or an IP address, and a TCP port."""

    host: str
    port: Count = Field(ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if _is_ip(v):
            return v
        labels = v.split(".")
        if len(v) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise ValueError(f"must be a DNS name (e.g. fl.example.org) or an IP address, got {v!r}")
        return v


class Consortium(Frozen):
    """A consortium file: its name, the server's address, the sites, and how long kits last.

    ``validity_days`` (default 365, 1..3650) is the lifetime of the kits' certificates.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    server: ServerAddress
    sites: list[SiteName] = Field(min_length=1)
    validity_days: Count = Field(365, ge=1, le=3650)

    @field_validator("sites")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        unique_names(v, "site names")
        folded: dict[str, str] = {}
        for n in v:
            if n in RESERVED_NAMES:
                raise ValueError(f"'{n}' is reserved (a file or folder of the output) and cannot name a site")
            # Each site gets a folder: on case-insensitive file systems (macOS, Windows)
            # 'A' and 'a' would be one folder.
            if n.lower() in folded:
                raise ValueError(f"site names must differ by more than case, '{folded[n.lower()]}' and '{n}'")
            folded[n.lower()] = n
        return v


def load_consortium(path: str | Path) -> Consortium:
    """Read and validate a YAML consortium file. Raises ConfigError naming the file and field."""
    path = Path(path)
    raw = read_yaml(path, "consortium file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a consortium file must be a mapping of fields, got {type(raw).__name__}")
    try:
        return Consortium.model_validate(raw)
    except ValidationError as e:
        lines = [describe_error(err) for err in e.errors()]
        raise ConfigError(f"{path}: invalid consortium file\n  " + "\n  ".join(lines)) from None


# --------------------------------------------------------------------------- certificates


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def create_ca(name: str, days: int) -> tuple[bytes, bytes]:
    """A self-signed CA for consortium ``name``, valid ``days`` days. Returns (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: the CA signs kits only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    name: str,
    role: str,
    host: str | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    consortium: str = "",
) -> tuple[bytes, bytes]:
    """A new key and a certificate for it signed by the CA. Returns (cert PEM, key PEM).

    ``role="server"``: CN = ``host`` (required), SAN = DNS name or IP address of ``host``,
    extended key usage serverAuth. ``role="site"``: CN = ``name``, SAN = URI
    ``urn:medfed:site:<name>``, extended key usage clientAuth. The subject carries
    O = ``consortium`` when given. ``not_before`` defaults to now - 5 minutes (clock skew),
    ``not_after`` to now + 365 days; both timezone-aware (naive ones are taken as UTC).
    """
    if role not in ("server", "site"):
        raise ValueError(f"role must be 'server' or 'site', got {role!r}")
    if role == "server" and not host:
        raise ValueError("a server certificate needs the server's host")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_before = now - CLOCK_SKEW if not_before is None else not_before
    not_after = now + dt.timedelta(days=365) if not_after is None else not_after

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, host if role == "server" else name)]
    if consortium:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium))
    if role == "server":
        assert host is not None
        san: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
        )
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        san = x509.UniformResourceIdentifier(SITE_URI_PREFIX + name)
        eku = ExtendedKeyUsageOID.CLIENT_AUTH
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())  # type: ignore[arg-type]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDHE key exchange: TLS with an EC key needs digital signatures only
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def common_name(cert_pem: bytes) -> str:
    """The subject common name (CN) of a PEM certificate; '' when it has none."""
    attrs = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 fingerprint of a PEM certificate: lowercase hex of the hash of its DER."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _same_public_key(a: Any, b: Any) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _date(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
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


def _make_private_dir(path: Path) -> None:
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # exactly 0700 whatever the umask


def _start_script(role: str, consortium: str) -> bytes:
    if role == "server":
        cmd = 'medfed server --kit "$(dirname "$0")" --job "${1:?usage: start.sh JOB.yaml}"'
    else:
        cmd = 'medfed site --kit "$(dirname "$0")" --data "${1:?usage: start.sh SITE_DATA.yaml}"'
    return (
        "#!/bin/sh\n"
        f"# Starts this {role} of the '{consortium}' consortium. Written by `medfed provision`.\n"
        f"exec {cmd}\n"
    ).encode()


def _readme(role: str, name: str, consortium: Consortium) -> bytes:
    who = "the server" if role == "server" else f"site '{name}'"
    start = "./start.sh JOB.yaml" if role == "server" else "./start.sh SITE_DATA.yaml"
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


# --------------------------------------------------------------------------- provisioning


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
        return self.not_after <= _now()


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
    not_after = min(_now() + dt.timedelta(days=cons.validity_days), ca_cert.not_valid_after_utc)
    kits: list[IssuedKit] = []
    participants: list[tuple[str, str]] = [(SERVER_NAME, "server")] + [(s, "site") for s in cons.sites]
    for name, role in participants:
        folder = out / name
        if folder.exists():
            kits.append(_existing_kit(folder, name, role, ca_cert, status="kept"))
            continue
        _build_kit(out, name, role, cons, ca_cert_pem, ca_key_pem, not_after)
        kits.append(_existing_kit(folder, name, role, ca_cert, status="created"))

    notes: list[str] = []
    listed = {n for n, _ in participants}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in listed and p.name != CA_DIR):
        if folder.name.startswith(".") or not (folder / "kit.json").is_file():
            continue
        kit = _existing_kit(folder, folder.name, "site", ca_cert, status="kept", in_file=False)
        kits.append(kit)
        notes.append(
            f"site '{kit.name}' is no longer in {consortium_path.name}; its kit in '{folder}' is kept and its "
            f"certificate is NOT revoked: it stays valid until {_date(kit.not_after)}"
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
        if not _same_public_key(cert.public_key(), ca_key.public_key()):
            raise ConfigError(f"CA folder '{ca_dir}': ca.key is not the key of ca.crt; restore both from your backup")
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if orgs and orgs[0].value != cons.name:
            raise ConfigError(
                f"CA folder '{ca_dir}' is the CA of consortium '{orgs[0].value}', not '{cons.name}'; "
                "provision into a new output folder (--out)"
            )
        if cert.not_valid_after_utc <= _now():
            raise ConfigError(
                f"CA certificate '{crt}' expired on {_date(cert.not_valid_after_utc)}; no kit can be issued with it. "
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
    _make_private_dir(tmp)
    _write_atomic(tmp / "ca.key", key_pem, 0o600)
    _write_atomic(tmp / "ca.crt", cert_pem, 0o644)
    os.rename(tmp, ca_dir)
    return cert_pem, key_pem, True


def _build_kit(
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
    _make_private_dir(tmp)
    info = {
        "consortium": cons.name,
        "name": name,
        "role": role,
        "server_host": cons.server.host,
        "server_port": cons.server.port,
        "medfed_kit_version": KIT_VERSION,
    }
    _write_atomic(tmp / "participant.key", key_pem, 0o600)
    _write_atomic(tmp / "participant.crt", cert_pem, 0o644)
    _write_atomic(tmp / "ca.crt", ca_cert_pem, 0o644)
    _write_atomic(tmp / "kit.json", (json.dumps(info, indent=2) + "\n").encode(), 0o644)
    _write_atomic(tmp / "start.sh", _start_script(role, cons.name), 0o755)
    _write_atomic(tmp / "README.txt", _readme(role, name, cons), 0o644)
    os.rename(tmp, out / name)


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
    _write_atomic(out / LEDGER, (json.dumps(record, indent=2) + "\n").encode(), 0o644)


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
    ("server" or "site"; None: either), a private key only its owner can read (POSIX), a
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
        what = "the server kit" if info.role == "server" else f"the kit of site '{info.name}'"
        need = "the server kit" if role == "server" else "a site kit"
        raise ConfigError(f"{where} is {what} (a {info.role} kit); `medfed {role}` needs {need}")

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

    now = _now()
    for label, c, file in (("the CA certificate", ca, "ca.crt"), ("the certificate", cert, "participant.crt")):
        start, end = c.not_valid_before_utc, c.not_valid_after_utc
        if now < start:
            raise ConfigError(
                f"{where}: {label} ({file}) is not valid yet: valid from {_date(start)} to {_date(end)}, now is "
                f"{_date(now)}; check this machine's clock"
            )
        if now >= end:
            raise ConfigError(
                f"{where}: {label} ({file}) expired on {_date(end)} (valid from {_date(start)}); ask the "
                "coordinator for a new kit (they delete its folder and re-run `medfed provision`)"
            )

    if not _same_public_key(key.public_key(), cert.public_key()):
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
