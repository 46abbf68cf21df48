"""Signed key advertisements: secure aggregation against a server that substitutes keys.

The server routes every site's public keys to the others. Unsigned, it could hand site b a
key of its own in place of site a's (a man in the middle): b would then encrypt its Shamir
shares for a under a key the server holds, and with the shares b sends every site so
deceived the server could rebuild b's self-mask seed and mask key and unmask b's update
alone. In a deployment every site holds a startup kit (transport/pki/): an ECDSA P-256
private key, its certificate from the consortium's CA (extended key usage clientAuth, CN
and SAN URI ``urn:medfed:site:<name>`` naming the site), and the CA's certificate. With
:class:`Credentials` built from it, a site

* signs its advertisement (:meth:`Credentials.sign`): ECDSA with SHA-256 over the JSON
  ``["medfed-secagg-v1", "advertisement", job_id, round, site, b64(c_pk), b64(s_pk)]``,
  and sends its certificate (DER) and the job and round it signed for beside its keys
  (messages.py :class:`~.messages.Signed`);
* checks every advertisement of the roster before it shares anything
  (:meth:`Credentials.check`): the certificate was issued by its own kit's CA, is valid
  now, is a site certificate (clientAuth, digital signatures, not a CA) naming the site
  it is listed under, the advertisement was signed for this job and round, and its
  signature verifies. Any failure raises :class:`~.messages.SecAggError` naming the site
  and why; the checking site then sends no shares and takes no further part in the
  round, so a substituted key is never used.

The server never signs or checks anything: it passes the signed advertisements on as
bounded, opaque fields. A simulation (no kits) sends unsigned advertisements, as before.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.core.errors import ConfigError
from medfed.privacy.secagg.messages import Advertisement, SecAggError, Signed, b64, check_name
from medfed.transport.pki.certificates import certificate_names, same_public_key, site_certificate_problem

if TYPE_CHECKING:
    from medfed.transport.pki import Kit

_ECDSA = ec.ECDSA(hashes.SHA256())


def signed_message(job_id: str, rnd: int, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """The bytes a site signs: the job, the round, its name and its two public keys."""
    return json.dumps(["medfed-secagg-v1", "advertisement", job_id, rnd, site, b64(c_pk), b64(s_pk)]).encode()


class Credentials:
    """A site's kit as secure aggregation uses it: its name, its private key and
    certificate, and the consortium CA that every other site's certificate must come from.

    Raises ConfigError when the key is not an ECDSA key, the certificate is not the key's
    or does not name ``site``, or the certificate was not issued by the CA (``load_kit``
    has refused such a kit already; this guards other callers)."""

    def __init__(self, site: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes):
        self.site = check_name(site, "site")
        where = f"site '{site}': secure aggregation credentials"
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
            self._ca = x509.load_pem_x509_certificate(ca_pem)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: cannot read the kit's key or certificates ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{where}: the kit's key is not an ECDSA key")
        if not same_public_key(key.public_key(), cert.public_key()):
            raise ConfigError(f"{where}: the kit's key is not the key of its certificate")
        if certificate_names(cert) != {site}:
            raise ConfigError(f"{where}: the kit's certificate names {sorted(certificate_names(cert))}, not '{site}'")
        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(f"{where}: the kit's certificate was not issued by the kit's CA") from None
        self._key = key
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)

    @classmethod
    def from_kit(cls, kit: Kit) -> Credentials:
        """From a :class:`~medfed.transport.pki.Kit` (``load_kit``): its name and PEMs."""
        return cls(kit.name, kit.key_pem, kit.cert_pem, kit.ca_pem)

    def __repr__(self) -> str:  # never the key
        return f"Credentials(site={self.site!r})"

    def sign(self, ad: Advertisement, job_id: str, rnd: int) -> Advertisement:
        """``ad`` (this site's keys of round ``rnd`` of job ``job_id``) with its signature."""
        sig = self._key.sign(signed_message(job_id, rnd, self.site, ad.c_pk, ad.s_pk), _ECDSA)
        return Advertisement(ad.c_pk, ad.s_pk, Signed(job_id, rnd, self._cert_der, sig))

    def problem(self, site: str, ad: Advertisement, job_id: str, rnd: int) -> str | None:
        """Why the advertisement listed under ``site`` for round ``rnd`` of job ``job_id``
        must not be used, or None when it holds."""
        s = ad.signed
        if s is None:
            return "it is not signed (in a deployment every site signs its keys with its kit key)"
        why = site_certificate_problem(s.cert, site, self._ca)
        if why is not None:
            return why
        if (s.job_id, s.round) != (job_id, rnd):
            return (f"it was signed for job {s.job_id!r} round {s.round}, this is job {job_id!r} round {rnd} "
                    "(replayed)")
        try:
            x509.load_der_x509_certificate(s.cert).public_key().verify(s.sig, signed_message(job_id, rnd, site, ad.c_pk, ad.s_pk), _ECDSA)
        except InvalidSignature:
            return "its signature does not verify against its certificate (the keys or fields were changed)"
        return None

    def check(self, site: str, ad: Advertisement, job_id: str, rnd: int) -> None:
        """Raise :class:`SecAggError` (its ``site``: the one whose advertisement failed)
        unless :meth:`problem` finds nothing."""
        why = self.problem(site, ad, job_id, rnd)
        if why is not None:
            raise SecAggError(
                f"site '{self.site}', field 'roster.{site}': refused the key advertisement of site '{site}': {why}; "
                f"site '{self.site}' takes no further part in round {rnd}",
                site,
            )
