"""Sealed messages: what one site sends others through the server, which relays them but
can neither read nor alter them (cyclic and swarm topologies in a deployment).

A sealed message carries a payload (a model, as safetensors bytes) from a sender site to
one or more recipient sites, with a label the sender states: the job, the round, the
purpose (what the recipients are to do with it), its name and, for a trained model, its
number of training examples. Built with the sender's startup kit (transport/pki/): an
ECDSA P-256 key and the certificate the consortium CA issued for it.

* Encryption: a fresh content key (AES-256-GCM, random nonce) encrypts the payload, with
  the label as associated data. For each recipient the content key is wrapped with
  AES-256-GCM under a key derived by HKDF-SHA256 from ECDH between a fresh ephemeral P-256
  key (one per message) and the key of the recipient's certificate. The server has no
  recipient key: it cannot decrypt.
* Signature: the sender signs, with its kit key (ECDSA, SHA-256), the label, the ephemeral
  public key, the wrapped keys, the nonce and the SHA-256 of the ciphertext; its
  certificate travels with the message. A recipient opens a message only when the
  certificate was issued by its own kit's CA, is valid now, is a site certificate naming
  the expected sender, the label is the one the recipient expects (job, round, purpose,
  sender: a message replayed from another round or sent for another purpose is refused),
  the signature verifies, and it is among the recipients. Any change to any field fails.

The server sees the label (it sets the schedule), sizes and hashes, never the payload.
In a simulation (no kits) the same messages travel unsealed: :class:`Sealer` is None at
both ends, and a site with a kit refuses an unsealed message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.core.errors import ConfigError, MedfedError
from medfed.transport.pki.certificates import certificate_names, same_public_key, site_certificate_problem

MAGIC = "medfed-sealed-v1"
_ECDSA = ec.ECDSA(hashes.SHA256())
_POINT = 65  # bytes of an uncompressed P-256 point
_WRAPPED = 32 + 16  # a 256-bit content key and its GCM tag
_ZERO_NONCE = bytes(12)  # each wrapping key is used once (a fresh ephemeral key per message)
MAX_RECIPIENTS = 10_000


class SealError(MedfedError):
    """A sealed message that must not be used (or cannot be made): the text says which
    message and why."""


@dataclass(frozen=True)
class Label:
    """What the sender states about a sealed message, in the clear and signed: the job,
    the round, the purpose, the sender, and the training examples behind a trained model
    (0 for a model that is not one site's training)."""

    job_id: str
    round: int
    purpose: str
    sender: str
    num_examples: int = 0

    def to_wire(self) -> list[Any]:
        return [self.job_id, self.round, self.purpose, self.sender, self.num_examples]


@dataclass(frozen=True)
class Envelope:
    """A sealed (or, in a simulation, plain) message. ``keys``: each recipient's wrapped
    content key; ``ciphertext``: the payload encrypted (plain: the payload itself)."""

    label: Label
    recipients: tuple[str, ...]
    ciphertext: bytes
    ephemeral: bytes = b""
    keys: dict[str, bytes] = field(default_factory=dict)
    nonce: bytes = b""
    cert: bytes = b""
    signature: bytes = b""

    @property
    def sealed(self) -> bool:
        return bool(self.signature)

    @property
    def digest(self) -> str:
        """The SHA-256 of the ciphertext (hex): what the server logs of what it relays."""
        return hashlib.sha256(self.ciphertext).hexdigest()

    @property
    def size(self) -> int:
        return len(self.ciphertext)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": MAGIC, "label": self.label.to_wire(), "recipients": list(self.recipients),
                               "ciphertext": _b64(self.ciphertext)}
        if self.sealed:
            out.update(ephemeral=_b64(self.ephemeral), keys={r: _b64(k) for r, k in self.keys.items()},
                       nonce=_b64(self.nonce), cert=_b64(self.cert), signature=_b64(self.signature))
        return out

    @classmethod
    def parse(cls, raw: Any, what: str, limit: int) -> Envelope:
        """An envelope from its wire form, or SealError naming ``what`` and the field."""
        if not isinstance(raw, dict) or raw.get("v") != MAGIC:
            raise SealError(f"{what}: not a sealed message of this medfed version")
        lab = raw.get("label")
        if (not isinstance(lab, list) or len(lab) != 5 or not isinstance(lab[0], str) or not _int(lab[1])
                or not isinstance(lab[2], str) or not isinstance(lab[3], str) or not _int(lab[4])):
            raise SealError(f"{what}: field 'label' is malformed")
        label = Label(lab[0], lab[1], lab[2], lab[3], lab[4])
        recipients = raw.get("recipients")
        if (not isinstance(recipients, list) or not 0 < len(recipients) <= MAX_RECIPIENTS
                or not all(isinstance(r, str) for r in recipients) or len(set(recipients)) != len(recipients)):
            raise SealError(f"{what}: field 'recipients' must list distinct site names")
        ciphertext = _unb64(raw.get("ciphertext"), what, "ciphertext", limit)
        if "signature" not in raw:
            return cls(label, tuple(recipients), ciphertext)
        keys = raw.get("keys")
        if not isinstance(keys, dict) or sorted(keys) != sorted(recipients):
            raise SealError(f"{what}: field 'keys' must hold one wrapped key per recipient")
        return cls(
            label, tuple(recipients), ciphertext,
            ephemeral=_unb64(raw.get("ephemeral"), what, "ephemeral", _POINT),
            keys={r: _unb64(k, what, f"keys.{r}", _WRAPPED) for r, k in keys.items()},
            nonce=_unb64(raw.get("nonce"), what, "nonce", 12),
            cert=_unb64(raw.get("cert"), what, "cert", 16_384),
            signature=_unb64(raw.get("signature"), what, "signature", 256),
        )


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(v: Any, what: str, name: str, limit: int) -> bytes:
    if not isinstance(v, str) or len(v) > 4 * (limit // 3 + 1):
        raise SealError(f"{what}: field '{name}' is missing or larger than {limit} bytes")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"{what}: field '{name}' is not base64") from None


def _label_bytes(label: Label, recipients: tuple[str, ...]) -> bytes:
    return json.dumps([MAGIC, *label.to_wire(), sorted(recipients)], separators=(",", ":")).encode()


def _signed_bytes(env: Envelope) -> bytes:
    return json.dumps([
        MAGIC, *env.label.to_wire(), sorted(env.recipients), _b64(env.ephemeral),
        {r: _b64(env.keys[r]) for r in sorted(env.keys)}, _b64(env.nonce), env.digest,
    ], separators=(",", ":")).encode()


def _wrapping_key(shared: bytes, recipient: str, label_bytes: bytes) -> bytes:
    info = f"{MAGIC}|wrap|{recipient}|".encode() + hashlib.sha256(label_bytes).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def plain(payload: bytes, label: Label, recipients: list[str]) -> Envelope:
    """An unsealed message (a simulation: no kits)."""
    return Envelope(label, tuple(recipients), bytes(payload))


class Sealer:
    """A site's kit as sealed messages use it: its name, key and certificate, and the
    consortium CA that every other site's certificate must come from. ConfigError when
    the key is not an ECDSA key, the certificate is not the key's or does not name
    ``site``."""

    def __init__(self, site: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes):
        self.site = site
        where = f"site '{site}': sealed messages"
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
            self._ca = x509.load_pem_x509_certificate(ca_pem)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: cannot read the kit's key or certificates ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not same_public_key(key.public_key(), cert.public_key()):
            raise ConfigError(f"{where}: the kit's key is not the ECDSA key of its certificate")
        if certificate_names(cert) != {site}:
            raise ConfigError(f"{where}: the kit's certificate names {sorted(certificate_names(cert))}, not '{site}'")
        self._key = key
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)

    def __repr__(self) -> str:  # never the key
        return f"Sealer(site={self.site!r})"

    def seal(self, payload: bytes, label: Label, recipients: dict[str, bytes]) -> Envelope:
        """``payload`` sealed for ``recipients`` (site -> certificate, DER, as the server
        passed them on). Each certificate is checked first: one that was not issued by the
        consortium CA or names another site is a SealError, and nothing is sent."""
        if label.sender != self.site:
            raise SealError(f"cannot seal a message as site '{label.sender}' (this is site '{self.site}')")
        if not recipients:
            raise SealError("a sealed message needs at least one recipient")
        publics = {}
        for name, der in recipients.items():
            why = site_certificate_problem(der, name, self._ca)
            if why is not None:
                raise SealError(f"will not seal a model for site '{name}': {why}")
            publics[name] = x509.load_der_x509_certificate(der).public_key()
        names = tuple(sorted(recipients))
        label_bytes = _label_bytes(label, names)
        content_key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
        ciphertext = AESGCM(content_key).encrypt(nonce, bytes(payload), label_bytes)
        eph = ec.generate_private_key(ec.SECP256R1())
        point = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        keys = {}
        for name in names:
            shared = eph.exchange(ec.ECDH(), publics[name])
            keys[name] = AESGCM(_wrapping_key(shared, name, label_bytes)).encrypt(_ZERO_NONCE, content_key, label_bytes)
        unsigned = Envelope(label, names, ciphertext, point, keys, nonce, self.cert_der, b"")
        signature = self._key.sign(_signed_bytes(unsigned), _ECDSA)
        return Envelope(label, names, ciphertext, point, keys, nonce, self.cert_der, signature)

    def open(self, env: Envelope, expect: Label) -> bytes:
        """The payload of ``env``, which must carry exactly the label ``expect`` (the
        job, round, purpose and sender the recipient's task names; the number of examples
        is the sender's and taken as it is), or SealError saying why it is refused."""
        what = (f"refused the message relayed as from site '{expect.sender}' "
                f"(round {expect.round}, {expect.purpose})")
        if not env.sealed:
            raise SealError(f"{what}: it is not sealed (in a deployment every site seals what it sends)")
        got = env.label
        if (got.job_id, got.round, got.purpose, got.sender) != (expect.job_id, expect.round, expect.purpose,
                                                                expect.sender):
            raise SealError(f"{what}: it was sealed by site '{got.sender}' for job {got.job_id}, round {got.round}, "
                            f"{got.purpose} (replayed or redirected)")
        why = site_certificate_problem(env.cert, got.sender, self._ca)
        if why is not None:
            raise SealError(f"{what}: {why}")
        try:
            x509.load_der_x509_certificate(env.cert).public_key().verify(env.signature, _signed_bytes(env), _ECDSA)
        except InvalidSignature:
            raise SealError(f"{what}: its signature does not verify (the message was altered on the way)") from None
        if self.site not in env.keys:
            raise SealError(f"{what}: it is not sealed for this site (its recipients: {', '.join(env.recipients)})")
        label_bytes = _label_bytes(got, env.recipients)
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), env.ephemeral)
            shared = self._key.exchange(ec.ECDH(), peer)
            content_key = AESGCM(_wrapping_key(shared, self.site, label_bytes)).decrypt(
                _ZERO_NONCE, env.keys[self.site], label_bytes)
            return AESGCM(content_key).decrypt(env.nonce, env.ciphertext, label_bytes)
        except (InvalidTag, ValueError):
            raise SealError(f"{what}: it does not decrypt with this site's key") from None


def seal_or_plain(sealer: Sealer | None, payload: bytes, label: Label, recipients: dict[str, bytes]) -> Envelope:
    """Sealed with ``sealer`` (a deployment), plain without (a simulation)."""
    if sealer is None:
        return plain(payload, label, list(recipients))
    return sealer.seal(payload, label, recipients)


def open_or_plain(sealer: Sealer | None, env: Envelope, expect: Label) -> bytes:
    """The payload: opened with ``sealer`` (which refuses a plain one), or, without one (a
    simulation), a plain message whose label is the one expected."""
    if sealer is not None:
        return sealer.open(env, expect)
    got = env.label
    if env.sealed or (got.job_id, got.round, got.purpose, got.sender) != (expect.job_id, expect.round, expect.purpose,
                                                                          expect.sender):
        raise SealError(f"a message relayed as from site '{expect.sender}' is not the one expected")
    return env.ciphertext

