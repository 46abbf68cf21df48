"""Certificate revocation: ``medfed provision CONSORTIUM --revoke NAME`` and the server's check.

A site whose kit is lost, stolen or leaves the consortium must be shut out before its
certificate expires. The CA signs a certificate revocation list (X.509 CRL, with
``cryptography``) naming the serial of each revoked site certificate, kept in the CA folder
(``ca/revoked.crl.pem``) and copied into the server's kit (``server/revoked.crl.pem``),
which its operator installs beside the running server's kit. The server reads the list
before it listens and again whenever the file changes (its size or modification time), at
the next call of any site: a revocation takes effect at once, without a restart. A list
that is not signed by the consortium's CA is refused when the server starts; a later one
that fails the check is logged and the last good list stays in force (fail closed: no
revocation is ever dropped by a damaged file). A revoked site's every call is refused
(PERMISSION_DENIED), logged and audited with the certificate's serial and the revocation
date.

The server's own certificate is not revoked this way (the sites would have to check a list
too); a compromised server kit means provisioning the consortium anew.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from medfed.core.errors import ConfigError
from medfed.transport.pki.certificates import utc_now
from medfed.transport.pki.kits import write_atomic

log = logging.getLogger("medfed")

CRL_FILE = "revoked.crl.pem"
CRL_DAYS = 3650  # next_update of a list: the server does not require a fresh one, the file is the truth


@dataclass(frozen=True)
class Revoked:
    """One revocation: the kit's name (from its certificate), serial and date."""

    name: str
    serial: int
    when: dt.datetime


def revoke(out_dir: Path, name: str) -> tuple[Revoked, list[Revoked], Path]:
    """Revoke the certificate of site ``name`` whose kit is in ``out_dir`` (the folder
    ``medfed provision`` wrote): add it to the CA's revocation list, re-signed by the CA,
    and copy the list into the server's kit. Returns (this revocation, every revocation in
    the list, the server kit's copy). ConfigError naming what is missing or wrong."""
    out = Path(out_dir)
    ca_dir = out / "ca"
    if not (ca_dir / "ca.crt").is_file() or not (ca_dir / "ca.key").is_file():
        raise ConfigError(f"'{out}' has no CA (ca/ca.crt and ca/ca.key); revoke from the folder medfed provision wrote, "
                          "on the machine that keeps the CA")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    if name == "server":
        raise ConfigError("--revoke server: the server's certificate is not revoked by a list (the sites do not read "
                          "one); provision the consortium anew into a new folder and hand out new kits")
    kit = out / name
    crt = kit / "participant.crt"
    if not crt.is_file():
        kits = sorted(p.name for p in out.iterdir() if (p / "participant.crt").is_file() and p.name != "server")
        raise ConfigError(f"--revoke {name}: no kit named '{name}' in '{out}' (its site kits: {', '.join(kits) or 'none'})")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    if cert.issuer != ca_cert.subject:
        raise ConfigError(f"--revoke {name}: '{crt}' was not issued by the CA in '{ca_dir}'")
    listed = read_list(ca_dir / CRL_FILE, ca_cert) if (ca_dir / CRL_FILE).is_file() else []
    now = utc_now().replace(microsecond=0)
    mine = next((r for r in listed if r.serial == cert.serial_number), None)
    if mine is None:
        mine = Revoked(name, cert.serial_number, now)
        listed = [*listed, mine]
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(now + dt.timedelta(days=CRL_DAYS)))
    for r in listed:
        entry = (x509.RevokedCertificateBuilder().serial_number(r.serial).revocation_date(r.when)
                 .add_extension(x509.CertificateIssuer([x509.DirectoryName(
                     x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, r.name)]))]), critical=False).build())
        builder = builder.add_revoked_certificate(entry)
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    write_atomic(ca_dir / CRL_FILE, pem, 0o644)
    server_copy = out / "server" / CRL_FILE
    if (out / "server").is_dir():
        write_atomic(server_copy, pem, 0o644)
    return mine, listed, server_copy


def read_list(path: Path, ca_cert: x509.Certificate) -> list[Revoked]:
    """The revocations in the CRL ``path``, checked to be signed by ``ca_cert``'s key and
    issued by it. ValueError naming the file otherwise."""
    try:
        crl = x509.load_pem_x509_crl(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"revocation list '{path}' cannot be read: {e}") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise ValueError(f"revocation list '{path}' is not signed by the consortium's CA")
    out = []
    for r in crl:
        try:
            names = r.extensions.get_extension_for_class(x509.CertificateIssuer).value
            name = str(names[0].value.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        except (x509.ExtensionNotFound, IndexError):
            name = "?"
        out.append(Revoked(name, r.serial_number, r.revocation_date_utc))
    return out


class Revocations:
    """The server's view of its kit's revocation list, read again when the file changes."""

    def __init__(self, path: Path, ca_pem: bytes):
        self.path = Path(path)
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self._seen: tuple[int, int] | None = None  # (size, mtime_ns) of the file last read
        self._by_serial: dict[int, Revoked] = {}
        if self.path.exists():  # a bad list at start is an error, not a silent empty list
            try:
                self._load()
            except ValueError as e:
                raise ConfigError(f"{e}; write it again with medfed provision --revoke") from None

    def _load(self) -> None:
        st = self.path.stat()
        self._seen = (st.st_size, st.st_mtime_ns)
        self._by_serial = {r.serial: r for r in read_list(self.path, self.ca)}
        if self._by_serial:
            log.info("revocation list %s: %d site certificate(s) revoked (%s)", self.path, len(self._by_serial),
                     ", ".join(sorted(r.name for r in self._by_serial.values())))

    def revoked(self, cert: x509.Certificate) -> Revoked | None:
        """The revocation of ``cert``, or None; the list is read again first if it changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_size, st.st_mtime_ns) != self._seen:
            try:
                self._load()
            except (OSError, ValueError) as e:  # the last good list stays in force
                self._seen = (st.st_size, st.st_mtime_ns)
                log.error("%s; the revocations read before stay in force", e)
        return self._by_serial.get(cert.serial_number)
