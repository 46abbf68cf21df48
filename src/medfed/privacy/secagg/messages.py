"""The messages of secure aggregation (see protocol.py), typed.

Each message arrives from the transport as a JSON dict; ``parse`` checks it field by field
and returns the typed form, or raises :class:`SecAggError` naming the site and the field
(``field 'roster.b.c_pk'``). ``to_wire`` gives the JSON dict back: bytes as standard
base64 strings, Shamir values as base64 of their 66 bytes. The sessions (sessions.py)
parse what they receive and send ``to_wire()`` of what they make.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfed.core.errors import RoundError
from medfed.privacy.secagg import shamir

KEY_BYTES = 32  # an X25519 key
NONCE_BYTES = 12  # AES-GCM's nonce
MIN_BOX = NONCE_BYTES + 16 + 2  # nonce, GCM tag, "{}"
MAX_BOX = 8192


class SecAggError(RoundError):
    """A secure-aggregation message is malformed or out of order, or too few sites remain
    for the round to finish. ``site`` names the site concerned, when one is."""

    def __init__(self, message: str, site: str | None = None):
        super().__init__(message)
        self.site = site


def default_threshold(n: int) -> int:
    """A majority of the ``n`` sites of a round: ``n // 2 + 1`` (n >= 2)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 sites, got n={n!r}")
    return n // 2 + 1


def check_threshold(threshold: int, n: int) -> None:
    """Raise :class:`SecAggError` naming ``threshold`` unless 2 <= threshold <= n. Below 2 a
    single share would reveal a site's key; above n no round could finish."""
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise SecAggError(f"threshold: expected an integer, got {threshold!r}")
    if not 2 <= threshold <= n:
        raise SecAggError(f"threshold: must satisfy 2 <= threshold <= {n} (the number of sites), got {threshold}")


def check_name(value: object, what: str) -> str:
    """``value`` as a non-empty string (a site name, a job id), or SecAggError naming ``what``."""
    if not isinstance(value, str) or not value:
        raise SecAggError(f"{what}: expected a non-empty string, got {value!r}")
    return value


# --- fields --------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object, site: str, field: str, size: int | None = None, bounds: tuple[int, int] | None = None) -> bytes:
    """The bytes of base64 string ``value``: exactly ``size`` of them, or within ``bounds``."""
    where = f"site '{site}', field '{field}'"
    if not isinstance(value, str):
        raise SecAggError(f"{where}: expected a base64 string, got {type(value).__name__}", site)
    if bounds is not None and len(value) > 4 * bounds[1] // 3 + 4:
        raise SecAggError(f"{where}: longer than {bounds[1]} bytes", site)
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except ValueError:
        raise SecAggError(f"{where}: not valid base64", site) from None
    if size is not None and len(data) != size:
        raise SecAggError(f"{where}: expected {size} bytes, got {len(data)}", site)
    if bounds is not None and not bounds[0] <= len(data) <= bounds[1]:
        raise SecAggError(f"{where}: expected {bounds[0]} to {bounds[1]} bytes, got {len(data)}", site)
    return data


def _object(value: object, site: str, field: str, keys: Iterable[str] | None = None) -> dict:
    """``value`` as a dict with str keys; exactly ``keys`` when given."""
    where = f"site '{site}', field '{field}'"
    if not isinstance(value, Mapping):
        raise SecAggError(f"{where}: expected an object (dict), got {type(value).__name__}", site)
    for k in value:
        if not isinstance(k, str):
            raise SecAggError(f"{where}: keys must be strings, got {k!r}", site)
    if keys is not None:
        want = set(keys)
        missing, extra = sorted(want - set(value)), sorted(set(value) - want)
        if missing or extra:
            raise SecAggError(f"{where}: missing {missing}, unexpected {extra}", site)
    return dict(value)


def _names(value: object, site: str, field: str) -> tuple[str, ...]:
    where = f"site '{site}', field '{field}'"
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SecAggError(f"{where}: expected a list of site names", site)
    if len(set(value)) != len(value):
        raise SecAggError(f"{where}: a site is listed twice", site)
    return tuple(value)


def _share(value: object, site: str, field: str) -> int:
    """A Shamir value (the y of a share) from its base64."""
    data = unb64(value, site, field, shamir.FIELD_BYTES)
    try:
        return shamir.y_from_bytes(data)
    except ValueError as e:
        raise SecAggError(f"site '{site}', field '{field}': {e}", site) from None


def _shares_wire(shares: Mapping[str, int]) -> dict[str, str]:
    return {v: b64(shamir.y_to_bytes(y)) for v, y in shares.items()}


# --- messages ------------------------------------------------------------------------------


MAX_CERT = 4096  # bytes of a site certificate (DER; a kit's is about 600)
MAX_SIGNATURE = 256  # bytes of a signature (DER; ECDSA P-256: at most 72)
MAX_JOB_ID = 256  # characters


@dataclass(frozen=True)
class Signed:
    """What a deployed site adds to its advertisement (signing.py): the job and round it
    signed for, its kit certificate (DER) and its signature over the job, the round, its
    name and its two keys. The server routes it untouched; every other site checks it."""

    job_id: str
    round: int
    cert: bytes
    sig: bytes

    @classmethod
    def parse(cls, raw: object, site: str, field: str) -> Signed:
        d = _object(raw, site, field, ("job_id", "round", "cert", "sig"))
        job_id, rnd = d["job_id"], d["round"]
        if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID:
            raise SecAggError(f"site '{site}', field '{field}.job_id': expected a job id of 1 to {MAX_JOB_ID} "
                              "characters", site)
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd < 2**31:
            raise SecAggError(f"site '{site}', field '{field}.round': expected a round number, got {rnd!r}", site)
        return cls(job_id, rnd, unb64(d["cert"], site, f"{field}.cert", bounds=(1, MAX_CERT)),
                   unb64(d["sig"], site, f"{field}.sig", bounds=(1, MAX_SIGNATURE)))

    def to_wire(self) -> dict[str, object]:
        return {"job_id": self.job_id, "round": self.round, "cert": b64(self.cert), "sig": b64(self.sig)}


@dataclass(frozen=True)
class Advertisement:
    """advertise (site -> server): the site's two public keys of the round,
    ``{"c_pk": b64(32), "s_pk": b64(32)}``; ``c_pk`` encrypts shares, ``s_pk`` seeds masks.
    In a deployment also ``"signed": {"job_id", "round", "cert": b64(DER), "sig": b64(DER)}``
    (:class:`Signed`)."""

    c_pk: bytes
    s_pk: bytes
    signed: Signed | None = None

    @classmethod
    def parse(cls, raw: object, site: str, field: str = "advertisement") -> Advertisement:
        keys = ("c_pk", "s_pk", "signed") if isinstance(raw, Mapping) and "signed" in raw else ("c_pk", "s_pk")
        d = _object(raw, site, field, keys)
        signed = Signed.parse(d["signed"], site, f"{field}.signed") if "signed" in d else None
        return cls(unb64(d["c_pk"], site, f"{field}.c_pk", KEY_BYTES), unb64(d["s_pk"], site, f"{field}.s_pk", KEY_BYTES),
                   signed)

    @property
    def public_keys(self) -> tuple[bytes, bytes]:
        return self.c_pk, self.s_pk

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {"c_pk": b64(self.c_pk), "s_pk": b64(self.s_pk)}
        if self.signed is not None:
            out["signed"] = self.signed.to_wire()
        return out


@dataclass(frozen=True)
class Roster:
    """roster (server -> sites): U1 with its advertisements as the sites sent them,
    ``{site: {"c_pk": b64, "s_pk": b64[, "signed": {...}]}}`` (the threshold travels beside it)."""

    keys: Mapping[str, Advertisement]

    @classmethod
    def parse(cls, raw: object, site: str) -> Roster:
        return cls({v: Advertisement.parse(e, site, f"roster.{v}") for v, e in _object(raw, site, "roster").items()})

    def to_wire(self) -> dict[str, dict[str, object]]:
        return {v: k.to_wire() for v, k in self.keys.items()}


@dataclass(frozen=True)
class SharePackage:
    """share_keys (site -> server): one sealed box (see :class:`SealedShares`) for every
    other roster site, ``{"shares": {other_site: b64(nonce 12 | AES-GCM ciphertext)}}``."""

    boxes: Mapping[str, bytes]

    @classmethod
    def parse(cls, raw: object, site: str, receivers: Iterable[str]) -> SharePackage:
        body = _object(raw, site, "message", ("shares",))
        boxes = _object(body["shares"], site, "shares", receivers)
        return cls({v: unb64(box, site, f"shares.{v}", bounds=(MIN_BOX, MAX_BOX)) for v, box in boxes.items()})

    def to_wire(self) -> dict[str, dict[str, str]]:
        return {"shares": {v: b64(box) for v, box in self.boxes.items()}}


@dataclass(frozen=True)
class Ciphertexts:
    """ciphertexts_for (server -> a site): the boxes the other U2 sites addressed to it,
    ``{from_site: b64}``."""

    boxes: Mapping[str, bytes]

    @classmethod
    def parse(cls, raw: object, site: str, roster: Roster) -> Ciphertexts:
        """Each sender must be another site of the receiving ``site``'s ``roster``."""
        boxes = {}
        for u, box in _object(raw, site, "received").items():
            field = f"received.{u}"
            if u not in roster.keys:
                raise SecAggError(f"site '{site}', field '{field}': site '{u}' is not in this round's roster", site)
            if u == site:
                raise SecAggError(f"site '{site}', field '{field}': a ciphertext from this site itself", site)
            boxes[u] = unb64(box, site, field, bounds=(MIN_BOX, MAX_BOX))
        return cls(boxes)

    def to_wire(self) -> dict[str, str]:
        return {u: b64(box) for u, box in self.boxes.items()}


@dataclass(frozen=True)
class SealedShares:
    """What one box holds: ``sender``'s Shamir shares, for ``receiver``, of its mask key
    ``s_sk`` and its self-mask seed ``b``. Sealed with AES-GCM under a key the two sites
    agree on, bound to the job, the round, the sender and the receiver: the server that
    routes it can neither read it nor hand it to another site unnoticed."""

    sender: str
    receiver: str
    s_sk: int
    b: int

    def seal(self, key: bytes, job_id: str, rnd: int) -> bytes:
        plain = json.dumps({"from": self.sender, "to": self.receiver, "s_sk": b64(shamir.y_to_bytes(self.s_sk)),
                            "b": b64(shamir.y_to_bytes(self.b))}).encode()
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(key).encrypt(nonce, plain, _aad(job_id, rnd, self.sender, self.receiver))

    @classmethod
    def open(cls, box: bytes, key: bytes, job_id: str, rnd: int, sender: str, receiver: str) -> SealedShares:
        """The shares in ``box``, which ``receiver`` got as ``sender``'s; SecAggError naming
        ``receiver`` and the box's field when it does not decrypt or names other sites."""
        me, field = receiver, f"received.{sender}"
        try:
            plain = AESGCM(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], _aad(job_id, rnd, sender, receiver))
        except InvalidTag:
            raise SecAggError(
                f"site '{me}', field '{field}': the key shares from site '{sender}' do not decrypt "
                "(tampered with, or addressed to another site)",
                me,
            ) from None
        try:
            msg = json.loads(plain)
        except ValueError:
            raise SecAggError(f"site '{me}', field '{field}': the decrypted shares are not JSON", me) from None
        msg = _object(msg, me, field, ("from", "to", "s_sk", "b"))
        if msg["from"] != sender or msg["to"] != me:
            raise SecAggError(f"site '{me}', field '{field}': the shares name sender {msg['from']!r} and receiver "
                              f"{msg['to']!r}", me)
        return cls(sender, me, _share(msg["s_sk"], me, f"{field}.s_sk"), _share(msg["b"], me, f"{field}.b"))


def _aad(job_id: str, rnd: int, sender: str, receiver: str) -> bytes:
    return json.dumps(["medfed-secagg-v1", "shares", job_id, rnd, sender, receiver]).encode()


@dataclass(frozen=True)
class UnmaskRequest:
    """unmask_request (server -> survivors): ``{"survivors": [site, ...], "dropped": [site, ...]}``,
    U3 and U2 \\ U3."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    @classmethod
    def parse(cls, survivors: object, dropped: object, site: str) -> UnmaskRequest:
        return cls(_names(survivors, site, "survivors"), _names(dropped, site, "dropped"))

    def to_wire(self) -> dict[str, list[str]]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}


@dataclass(frozen=True)
class UnmaskReply:
    """unmask answer (survivor -> server): its share of each survivor's self-mask seed and
    of each dropped site's mask key, ``{"b_shares": {survivor: share}, "s_shares":
    {dropped_site: share}}``; a site never gives both of one site."""

    b_shares: Mapping[str, int]
    s_shares: Mapping[str, int]

    @classmethod
    def parse(cls, raw: object, site: str, survivors: Iterable[str], dropped: Iterable[str]) -> UnmaskReply:
        """Exactly one share of each of ``survivors`` and of ``dropped``."""
        body = _object(raw, site, "message", ("b_shares", "s_shares"))
        b = _object(body["b_shares"], site, "b_shares", survivors)
        s = _object(body["s_shares"], site, "s_shares", dropped)
        return cls({u: _share(y, site, f"b_shares.{u}") for u, y in b.items()},
                   {v: _share(y, site, f"s_shares.{v}") for v, y in s.items()})

    def to_wire(self) -> dict[str, dict[str, str]]:
        return {"b_shares": _shares_wire(self.b_shares), "s_shares": _shares_wire(self.s_shares)}
