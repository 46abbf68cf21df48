"""Who is calling the hub: the site named by the caller's certificate (checked by TLS to be
of the consortium CA), which must be a site certificate (not an admin's), not revoked, of a
site of this job that is not left out of the run; and the first header of each call, which
must name that same site (and this job). A queue server's admin calls: :func:`identify_admin`."""

from __future__ import annotations

from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from medfed.core.errors import CodecError
from medfed.transport.grpc import wire
from medfed.transport.grpc.guard import Refused
from medfed.transport.pki.certificates import SITE_URI_PREFIX, admin_names
from medfed.transport.pki.revocation import Revocations


class Callers:
    """The sites allowed to call (the job's), those left out of the run, the job's id, and
    the consortium's revocation list (``revocations``, transport/pki/revocation.py)."""

    def __init__(self, allowed: frozenset[str], job_id: str, revocations: Revocations | None = None):
        self.allowed = allowed
        self.job_id = job_id
        self.revocations = revocations
        self.excluded: dict[str, str] = {}  # sites left out of this run, and why

    def exclude(self, site: str, reason: str) -> None:
        self.excluded[site] = reason

    def identify(self, context: grpc.ServicerContext) -> tuple[str, str]:
        """(site name, certificate fingerprint) of the caller, or Refused."""
        site, cert = self.site_certificate(context)
        if site not in self.allowed:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate names site '{site}', which is not part of this job ({', '.join(sorted(self.allowed))})",
                site,
            )
        if site in self.excluded:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"this site is left out of the run: {self.excluded[site]}",
                          site)
        return site, cert.fingerprint(hashes.SHA256()).hex()

    def site_certificate(self, context: grpc.ServicerContext) -> tuple[str, x509.Certificate]:
        """(site name, certificate) of a caller with a site certificate that is not revoked,
        whatever the job; or Refused."""
        site, cert = _caller(context)
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = []
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"certificate '{site}' is not a site certificate", site)
        if admin_names(cert):  # an admin submits jobs; it never takes part in one
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"certificate '{site}' is an admin certificate (role admin), not a site certificate", site)
        _check_not_revoked(self.revocations, cert, "site", site)
        return site, cert

    def check(self, hdr: dict[str, Any], site: str, with_job: bool = True) -> None:
        """The header ``hdr`` of a call of ``site`` names that site (and this job)."""
        if hdr.get("site") != site:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"message says site {hdr.get('site')!r} but the certificate is '{site}'",
            )
        if with_job and hdr.get("job_id") != self.job_id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"message is for job {hdr.get('job_id')!r}, this server runs job {self.job_id}",
            )


def identify_admin(context: grpc.ServicerContext, revocations: Revocations | None) -> tuple[str, str]:
    """(admin name, certificate fingerprint) of a caller of the admin service: a certificate
    of the consortium CA (checked by TLS) with the admin role (an ``urn:medfed:admin:`` name,
    as an admin kit's from ``medfed provision``), not revoked; else Refused
    (PERMISSION_DENIED) naming the role the certificate has."""
    name, cert = _caller(context)
    if admin_names(cert) != {name}:
        role = "site" if _is_site(cert, name) else "unknown"
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"certificate '{name}' has the {role} role, not the admin role: "
                      "submitting and managing jobs needs the admin kit from `medfed provision`", name)
    _check_not_revoked(revocations, cert, "admin", name)
    return name, cert.fingerprint(hashes.SHA256()).hex()


def _caller(context: grpc.ServicerContext) -> tuple[str, x509.Certificate]:
    """(common name, certificate) of the caller, as TLS verified them; Refused
    (UNAUTHENTICATED) without a client certificate."""
    auth = context.auth_context()
    pem = (auth.get("x509_pem_cert") or [b""])[0]
    names = auth.get("x509_common_name") or []
    if not pem or not names:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
    return names[0].decode(errors="replace"), x509.load_pem_x509_certificate(pem)


def _check_not_revoked(revocations: Revocations | None, cert: x509.Certificate, role: str, name: str) -> None:
    """Refused (PERMISSION_DENIED) naming the ``role`` and ``name`` when ``cert`` is revoked."""
    gone = revocations.revoked(cert) if revocations is not None else None
    if gone is not None:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"the certificate of {role} '{name}' (serial {cert.serial_number:x}) was revoked on "
                      f"{gone.when:%Y-%m-%d %H:%M} UTC", name)


def _is_site(cert: x509.Certificate, name: str) -> bool:
    """Whether ``cert`` is a site certificate of ``name`` (its ``urn:medfed:site:`` URI)."""
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return False
    return SITE_URI_PREFIX + name in uris


def read_header(data: Any, what: str) -> dict[str, Any]:
    """The JSON header of a call, or Refused."""
    try:
        return wire.decode_header(data, what)
    except CodecError as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
