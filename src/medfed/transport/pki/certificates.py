"""The consortium's certificate authority and the certificates it issues: ECDSA P-256 keys,
SHA-256 signatures; a server certificate (serverAuth) names the server's host, a site
certificate (clientAuth) the site."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650  # the CA outlives the kits so that sites added later still fit under it
CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is back-dated by this much
SITE_URI_PREFIX = "urn:medfed:site:"
ADMIN_URI_PREFIX = "urn:medfed:admin:"  # an admin certificate's SAN: the role no site certificate carries


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address (v4 or v6) rather than a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def utc_now() -> dt.datetime:
    """Now, timezone-aware (UTC): what certificate validity is compared with."""
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
    now = utc_now()
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
    ``urn:medfed:site:<name>``, extended key usage clientAuth. ``role="admin"`` (who submits
    and manages a queue server's jobs): CN = ``name``, SAN = URI ``urn:medfed:admin:<name>``
    (never a site URI), extended key usage clientAuth. The subject carries
    O = ``consortium`` when given. ``not_before`` defaults to now - 5 minutes (clock skew),
    ``not_after`` to now + 365 days; both timezone-aware (naive ones are taken as UTC).
    """
    if role not in ("server", "site", "admin"):
        raise ValueError(f"role must be 'server', 'site' or 'admin', got {role!r}")
    if role == "server" and not host:
        raise ValueError("a server certificate needs the server's host")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utc_now()
    not_before = now - CLOCK_SKEW if not_before is None else not_before
    not_after = now + dt.timedelta(days=365) if not_after is None else not_after

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, host if role == "server" else name)]
    if consortium:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium))
    if role == "server":
        assert host is not None
        san: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(host)) if is_ip(host) else x509.DNSName(host)
        )
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        san = x509.UniformResourceIdentifier((ADMIN_URI_PREFIX if role == "admin" else SITE_URI_PREFIX) + name)
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


def same_public_key(a: Any, b: Any) -> bool:
    """Whether two public keys are the same key (compared as DER)."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def format_date(t: dt.datetime) -> str:
    """``t`` as messages show it: ``2026-01-31 12:00 UTC``."""
    return t.strftime("%Y-%m-%d %H:%M UTC")


def certificate_names(cert: x509.Certificate) -> set[str]:
    """The site names a certificate gives: its common names and its ``urn:medfed:site:``
    SAN URIs (a kit's site certificate gives one name, twice)."""
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    names.update(u[len(SITE_URI_PREFIX):] for u in uris if u.startswith(SITE_URI_PREFIX))
    return names


def admin_names(cert: x509.Certificate) -> set[str]:
    """The admin names a certificate gives: its ``urn:medfed:admin:`` SAN URIs (an admin
    kit's certificate gives one; a site's or the server's none)."""
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return set()
    return {u[len(ADMIN_URI_PREFIX):] for u in uris if u.startswith(ADMIN_URI_PREFIX)}


def _extension(cert: x509.Certificate, kind: type) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _signing_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert`` is not a site certificate that may sign, or None."""
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        return "its certificate is a CA certificate, not a site certificate"
    if admin_names(cert):
        return "its certificate is an admin certificate, not a site certificate"
    usage = _extension(cert, x509.ExtendedKeyUsage)
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return "its certificate is not a site certificate (no clientAuth extended key usage)"
    key_usage = _extension(cert, x509.KeyUsage)
    if key_usage is not None and not key_usage.digital_signature:
        return "its certificate does not allow digital signatures (key usage)"
    if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
        return "its certificate's key is not an ECDSA key (a kit's is ECDSA P-256)"
    return None


def site_certificate_problem(der: bytes, site: str, ca: x509.Certificate) -> str | None:
    """Why the certificate ``der`` (DER) must not be taken as site ``site``'s, or None: it
    was not issued by the consortium CA ``ca``, is not valid now, is not a site certificate
    that may sign with an ECDSA key, or names another site."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "its certificate is not a valid X.509 certificate"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "its certificate was not issued by this consortium's CA"
    now, start, end = utc_now(), cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now < end:
        return f"its certificate is not valid now (valid from {format_date(start)} to {format_date(end)})"
    why = _signing_problem(cert)
    if why is not None:
        return why
    names = certificate_names(cert)
    if names != {site}:
        return f"its certificate names {', '.join(repr(n) for n in sorted(names)) or 'no site'}, not '{site}'"
    return None
