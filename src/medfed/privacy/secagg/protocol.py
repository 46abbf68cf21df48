"""Secure aggregation: the protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), semi-honest variant, complete graph.

Pure and transport-free: a :class:`SiteSession` per site and a :class:`ServerSession` per
round exchange plain dicts of str/int/list/dict (bytes as base64 strings, JSON-able); the
masked vectors travel as int64 tensors (an ``Update`` with ``Encoding.MASKED``). Every
message is validated where it arrives; a bad one raises :class:`SecAggError` naming the
site and the field. Stages and who takes part in each:

====  ====================================  =================================================
 U1   sites that advertised keys            site: ``advertise()`` -> server
 U2   U1 sites that sent encrypted shares   site: ``share_keys(roster, t)`` -> server
 U3   U2 sites whose masked input arrived   site: ``mask(x, ciphertexts)`` -> server
 U4   U3 sites that answered the unmasking  site: ``unmask(survivors, dropped)`` -> server
====  ====================================  =================================================

Messages (``b64`` = standard base64 string; ``share`` = b64 of a 66-byte Shamir value):

- advertise:        ``{"c_pk": b64(32), "s_pk": b64(32)}``
- roster (server):  ``{site: {"c_pk": b64, "s_pk": b64}}`` over U1, plus the threshold
- share_keys:       ``{"shares": {other_site: b64(nonce 12 | AES-GCM ciphertext)}}``
- ciphertexts_for:  ``{from_site: b64}`` (the U2 senders' ciphertexts for that site)
- unmask_request:   ``{"survivors": [site, ...], "dropped": [site, ...]}``
- unmask answer:    ``{"b_shares": {survivor: share}, "s_shares": {dropped_site: share}}``

Masking (all mod 2^32): site u sends ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u}
±PRG(s_uv)``, + when u < v by site name, - otherwise, where ``b_u`` is a fresh 32-byte
self-mask seed and ``s_uv = HKDF(X25519(s_sk_u, s_pk_v)) = s_vu``. Summed over U3 the pairs
inside U3 cancel; the server reconstructs ``b_u`` for u in U3 and ``s_sk_v`` for v in
U2 \\ U3 from t Shamir shares (x = 1 + the site's index in the sorted U1) and removes what
is left, giving ``sum_{u in U3} x_u``. A site never gives both a ``b`` and an ``s_sk``
share of the same site, so no input is ever unmasked alone.

Threat model: the server and the sites are honest-but-curious (they follow the protocol
and try to learn from what they see). The server, even together with fewer than ``t``
sites, learns only the sum of the U3 inputs (and who dropped). What is secret: each site's
``x``, ``b_u``, ``c_sk``, ``s_sk`` and the shares it holds. NOT defended: an active server.
Public keys are not signed (no PKI in this layer), so a malicious server could substitute
keys and read the shares; it could also tell different sites different survivor lists
(the paper's malicious variant adds signatures and a consistency round). Run the
transport over mutually authenticated TLS and keep the threshold above n/2.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterable, Mapping

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.core.errors import RoundError
from medfed.privacy.secagg import shamir
from medfed.privacy.secagg.masking import RING, SEED_BYTES, add_masks, check_ring

KEY_BYTES = 32
_NONCE_BYTES = 12
_MIN_BOX = _NONCE_BYTES + 16 + 2  # nonce, GCM tag, "{}"
_MAX_BOX = 8192


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


# --- wire helpers ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, site: str, field: str, size: int | None = None, bounds: tuple[int, int] | None = None) -> bytes:
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


def _dict(value: object, site: str, field: str, keys: Iterable[str] | None = None) -> dict:
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


def _names(value: object, site: str, field: str) -> list[str]:
    where = f"site '{site}', field '{field}'"
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SecAggError(f"{where}: expected a list of site names", site)
    if len(set(value)) != len(value):
        raise SecAggError(f"{where}: a site is listed twice", site)
    return list(value)


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise SecAggError(f"{what}: expected a non-empty string, got {value!r}")
    return value


def _keys(entry: object, site: str, field: str) -> tuple[bytes, bytes]:
    d = _dict(entry, site, field, ("c_pk", "s_pk"))
    c_pk = _unb64(d["c_pk"], site, f"{field}.c_pk", KEY_BYTES)
    s_pk = _unb64(d["s_pk"], site, f"{field}.s_pk", KEY_BYTES)
    return c_pk, s_pk


def _share_y(value: object, site: str, field: str) -> int:
    data = _unb64(value, site, field, shamir.FIELD_BYTES)
    try:
        return shamir.y_from_bytes(data)
    except ValueError as e:
        raise SecAggError(f"site '{site}', field '{field}': {e}", site) from None


# --- key derivation ------------------------------------------------------------------------


def _kdf(secret: bytes, purpose: str, job_id: str, rnd: int) -> bytes:
    info = json.dumps(["medfed-secagg-v1", purpose, job_id, rnd]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def _agree(sk: X25519PrivateKey, pk: bytes, site: str, field: str) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise SecAggError(f"site '{site}', field '{field}': not a usable X25519 public key", site) from None


def _aad(job_id: str, rnd: int, sender: str, receiver: str) -> bytes:
    return json.dumps(["medfed-secagg-v1", "shares", job_id, rnd, sender, receiver]).encode()


def _sign(u: str, v: str) -> int:
    """The sign of the pairwise mask between u and v in u's masked input."""
    return 1 if u < v else -1


def _abort(k: int, what: str, t: int, site: str | None = None) -> SecAggError:
    prefix = "" if site is None else f"site '{site}': "
    return SecAggError(f"{prefix}only {k} sites {what}, the threshold is {t}; the round is aborted", site)


# --- site ------------------------------------------------------------------------------------

_SITE_STEPS = ("none", "advertise()", "share_keys()", "mask()", "unmask()")


class SiteSession:
    """One site's side of one round. Call, once each and in order: :meth:`advertise`,
    :meth:`share_keys`, :meth:`mask`, :meth:`unmask`. Holds this round's secrets (two
    X25519 private keys, the self-mask seed, the shares of other sites' secrets); make a
    new session each round."""

    def __init__(self, site: str, job_id: str, rnd: int):
        self.site = _check_name(site, "site")
        self.job_id = _check_name(job_id, "job_id")
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            raise SecAggError(f"rnd: expected an integer, got {rnd!r}", site)
        self.round = rnd
        self._c_sk = X25519PrivateKey.generate()  # encrypts the shares (c for "channel")
        self._s_sk = X25519PrivateKey.generate()  # seeds the pairwise masks
        self._stage = 0
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._threshold = 0
        self._b_seed = b""
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (share of s_sk, share of b)
        self._u2: frozenset[str] = frozenset()

    def _enter(self, stage: int, method: str) -> None:
        if self._stage != stage:
            raise SecAggError(
                f"site '{self.site}': {method}() called out of order (each step runs once; the last "
                f"step of this session: {_SITE_STEPS[self._stage]})",
                self.site,
            )

    def advertise(self) -> dict[str, str]:
        """This round's two public keys: ``{"c_pk": b64(32), "s_pk": b64(32)}``."""
        self._enter(0, "advertise")
        self._stage = 1
        return {"c_pk": _b64(self._c_sk.public_key().public_bytes_raw()), "s_pk": _b64(self._s_sk.public_key().public_bytes_raw())}

    def share_keys(self, roster: Mapping[str, Mapping[str, str]], threshold: int) -> dict[str, dict[str, str]]:
        """``{"shares": {v: b64 ciphertext}}`` for every other roster site v: t-of-n Shamir
        shares of this site's ``s_sk`` and of a fresh self-mask seed ``b_u``, encrypted
        with AES-GCM under HKDF(X25519(c_sk_u, c_pk_v)), bound to job, round, u and v.

        ``roster`` (U1, the server's broadcast) must list this site with the keys it
        advertised, hold at least ``threshold`` sites and no repeated key."""
        self._enter(1, "share_keys")
        me = self.site
        parsed = {v: _keys(e, me, f"roster.{v}") for v, e in _dict(roster, me, "roster").items()}
        if me not in parsed:
            raise SecAggError(f"site '{me}', field 'roster': this site is not in it", me)
        if parsed[me] != (self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw()):
            raise SecAggError(f"site '{me}', field 'roster.{me}': not the keys this site advertised", me)
        all_keys = [k for pair in parsed.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError(f"site '{me}', field 'roster': a public key appears twice", me)
        try:
            check_threshold(threshold, len(parsed))
        except SecAggError as e:
            raise SecAggError(f"site '{me}': {e} (roster of {len(parsed)} sites)", me) from None
        names = sorted(parsed)
        self._b_seed = secrets.token_bytes(SEED_BYTES)
        s_shares = shamir.share(self._s_sk.private_bytes_raw(), len(names), threshold)
        b_shares = shamir.share(self._b_seed, len(names), threshold)
        boxes: dict[str, str] = {}
        for i, v in enumerate(names):
            if v == me:
                self._held[me] = (s_shares[i][1], b_shares[i][1])
                continue
            key = _kdf(_agree(self._c_sk, parsed[v][0], me, f"roster.{v}.c_pk"), "shares", self.job_id, self.round)
            plain = json.dumps(
                {"from": me, "to": v, "s_sk": _b64(shamir.y_to_bytes(s_shares[i][1])), "b": _b64(shamir.y_to_bytes(b_shares[i][1]))}
            ).encode()
            nonce = os.urandom(_NONCE_BYTES)
            boxes[v] = _b64(nonce + AESGCM(key).encrypt(nonce, plain, _aad(self.job_id, self.round, me, v)))
        self._roster, self._threshold = parsed, threshold
        self._stage = 2
        return {"shares": boxes}

    def mask(self, x: torch.Tensor, received: Mapping[str, str]) -> torch.Tensor:
        """This site's masked input ``y`` (int64, shape of ``x``, values in [0, 2^32)).

        ``x`` is the flat ring vector to sum (see :class:`~.masking.FixedPoint`);
        ``received`` the server's ``ciphertexts_for(site)``: one ciphertext per other site
        of U2. Decrypts and keeps the shares they hold; U2 = their senders plus this site."""
        self._enter(2, "mask")
        me = self.site
        try:
            check_ring(x, "x")
        except (TypeError, ValueError) as e:
            raise SecAggError(f"site '{me}': {e}", me) from None
        boxes = _dict(received, me, "received")
        if len(boxes) + 1 < self._threshold:
            raise _abort(len(boxes) + 1, "shared their keys", self._threshold, me)
        held = dict(self._held)
        for u, box in boxes.items():
            held[u] = self._open(u, box)
        pairs = [(self._b_seed, 1)]
        for v in sorted(boxes):
            seed = _kdf(_agree(self._s_sk, self._roster[v][1], me, f"roster.{v}.s_pk"), "mask", self.job_id, self.round)
            pairs.append((seed, _sign(me, v)))
        y = add_masks(x, pairs)
        self._held, self._u2 = held, frozenset(boxes) | {me}
        self._stage = 3
        return y

    def _open(self, u: str, box: object) -> tuple[int, int]:
        me, field = self.site, f"received.{u}"
        if u not in self._roster:
            raise SecAggError(f"site '{me}', field '{field}': site '{u}' is not in this round's roster", me)
        if u == me:
            raise SecAggError(f"site '{me}', field '{field}': a ciphertext from this site itself", me)
        data = _unb64(box, me, field, bounds=(_MIN_BOX, _MAX_BOX))
        key = _kdf(_agree(self._c_sk, self._roster[u][0], me, f"roster.{u}.c_pk"), "shares", self.job_id, self.round)
        try:
            plain = AESGCM(key).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(self.job_id, self.round, u, me))
        except InvalidTag:
            raise SecAggError(
                f"site '{me}', field '{field}': the key shares from site '{u}' do not decrypt "
                "(tampered with, or addressed to another site)",
                me,
            ) from None
        try:
            msg = json.loads(plain)
        except ValueError:
            raise SecAggError(f"site '{me}', field '{field}': the decrypted shares are not JSON", me) from None
        msg = _dict(msg, me, field, ("from", "to", "s_sk", "b"))
        if msg["from"] != u or msg["to"] != me:
            raise SecAggError(f"site '{me}', field '{field}': the shares name sender {msg['from']!r} and receiver {msg['to']!r}", me)
        return _share_y(msg["s_sk"], me, f"{field}.s_sk"), _share_y(msg["b"], me, f"{field}.b")

    def unmask(self, survivors: list[str], dropped: list[str]) -> dict[str, dict[str, str]]:
        """``{"b_shares": {v: share}, "s_shares": {v: share}}``: this site's shares of the
        self-mask seed of every survivor and of the mask key of every dropped site.

        Refuses when a site is in both lists, when survivors and dropped together are not
        exactly U2, when this site is not a survivor, or when survivors are fewer than the
        threshold. Answers once: a second request could reveal both secrets of a site."""
        self._enter(3, "unmask")
        me = self.site
        surv, drop = _names(survivors, me, "survivors"), _names(dropped, me, "dropped")
        both = sorted(set(surv) & set(drop))
        if both:
            raise SecAggError(f"site '{me}': sites {both} are listed as both survivors and dropped", me)
        unknown = sorted((set(surv) | set(drop)) - self._u2)
        if unknown:
            raise SecAggError(f"site '{me}': it holds no share of sites {unknown} (they did not share keys with it)", me)
        missing = sorted(self._u2 - set(surv) - set(drop))
        if missing:
            raise SecAggError(f"site '{me}': sites {missing} are neither survivors nor dropped", me)
        if me not in surv:
            raise SecAggError(f"site '{me}', field 'survivors': this site sent its masked input but is not listed", me)
        if len(surv) < self._threshold:
            raise SecAggError(
                f"site '{me}': only {len(surv)} survivors, the threshold is {self._threshold}; refusing to unmask", me
            )
        answer = {
            "b_shares": {v: _b64(shamir.y_to_bytes(self._held[v][1])) for v in surv},
            "s_shares": {v: _b64(shamir.y_to_bytes(self._held[v][0])) for v in drop},
        }
        self._held, self._b_seed = {}, b""  # drop references to what is no longer needed
        self._stage = 4
        return answer


# --- server ------------------------------------------------------------------------------------


class ServerSession:
    """The server's side of one round: collects, routes and checks messages, then removes
    the masks from the sum of the masked inputs. It never receives a site's plain ``x``.

    ``threshold`` t (>= 2) is how many sites must remain at every stage; ``length`` the
    number of values in each ring vector. Each stage closes the first time its outcome is
    asked for (:meth:`roster`, :meth:`ciphertexts_for`, :meth:`unmask_request`,
    :meth:`result`); a message that comes later is refused. The server's caller decides
    when to stop waiting (timeouts) and so who counts as dropped."""

    def __init__(self, job_id: str, rnd: int, threshold: int, length: int):
        self.job_id = _check_name(job_id, "job_id")
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            raise SecAggError(f"rnd: expected an integer, got {rnd!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise SecAggError(f"threshold: must be an integer >= 2, got {threshold!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise SecAggError(f"length: expected an integer >= 1, got {length!r}")
        self.round, self.threshold, self.length = rnd, threshold, length
        self._stage = 0  # 0 advertising, 1 sharing, 2 masking, 3 unmasking, 4 done
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # U1
        self._boxes: dict[str, dict[str, str]] = {}  # sender -> receiver -> b64
        self._u2: list[str] = []
        self._sum = torch.zeros(length, dtype=torch.int64)
        self._masked: set[str] = set()  # U3
        self._answers: dict[str, tuple[dict[str, int], dict[str, int]]] = {}  # U4
        self._result: torch.Tensor | None = None
        self._aborted: SecAggError | None = None  # once aborted, every call says why

    def _abort(self, err: SecAggError) -> SecAggError:
        self._aborted = err
        return err

    def _check_alive(self) -> None:
        if self._aborted is not None:
            raise SecAggError(f"this round was aborted: {self._aborted}")

    def _check_stage(self, site: str, stage: int, what: str) -> None:
        self._check_alive()
        if self._stage < stage:
            raise SecAggError(f"site '{site}': its {what} came before the server asked for it", site)
        if self._stage > stage:
            raise SecAggError(f"site '{site}': its {what} came after that stage closed", site)

    def receive_advertisement(self, site: str, msg: Mapping[str, str]) -> None:
        """Stage 0: ``msg = {"c_pk": b64(32), "s_pk": b64(32)}`` from ``site``."""
        site = _check_name(site, "site")
        self._check_stage(site, 0, "key advertisement")
        if site in self._keys:
            raise SecAggError(f"site '{site}': advertised keys twice", site)
        c_pk, s_pk = _keys(msg, site, "advertisement")
        for other, pair in self._keys.items():
            if {c_pk, s_pk} & set(pair):
                raise SecAggError(f"site '{site}': advertised a public key that site '{other}' already uses", site)
        if c_pk == s_pk:
            raise SecAggError(f"site '{site}': advertised the same key as c_pk and s_pk", site)
        self._keys[site] = (c_pk, s_pk)

    def roster(self) -> dict[str, dict[str, str]]:
        """U1 with its keys, ``{site: {"c_pk", "s_pk"}}``, for every site (with
        :attr:`threshold`). The first call fixes it; fewer than t sites abort the round."""
        self._check_alive()
        if self._stage == 0:
            if len(self._keys) < self.threshold:
                raise self._abort(_abort(len(self._keys), "advertised keys", self.threshold))
            self._stage = 1
        return {v: {"c_pk": _b64(c), "s_pk": _b64(s)} for v, (c, s) in sorted(self._keys.items())}

    def receive_shares(self, site: str, msg: Mapping[str, Mapping[str, str]]) -> None:
        """Stage 1: ``msg = {"shares": {v: b64}}`` from ``site``, one per other U1 site."""
        site = _check_name(site, "site")
        if site not in self._keys:
            raise SecAggError(f"site '{site}': sent key shares but is not in this round's roster", site)
        self._check_stage(site, 1, "key shares")
        if site in self._boxes:
            raise SecAggError(f"site '{site}': sent key shares twice", site)
        body = _dict(msg, site, "message", ("shares",))
        boxes = _dict(body["shares"], site, "shares", set(self._keys) - {site})
        for v, box in boxes.items():
            _unb64(box, site, f"shares.{v}", bounds=(_MIN_BOX, _MAX_BOX))
        self._boxes[site] = boxes

    def ciphertexts_for(self, site: str) -> dict[str, str]:
        """``{u: b64}``: the ciphertexts addressed to ``site`` by the other U2 sites. The
        first call fixes U2; fewer than t sites abort the round."""
        self._check_alive()
        self._close_sharing()
        if self._stage < 1:
            raise SecAggError(f"site '{site}': the roster is not fixed yet", site)
        if site not in self._u2:
            raise SecAggError(f"site '{site}': did not share its keys in time; it takes no further part in this round", site)
        return {u: self._boxes[u][site] for u in self._u2 if u != site}

    def _close_sharing(self) -> None:
        if self._stage == 1:
            if len(self._boxes) < self.threshold:
                raise self._abort(_abort(len(self._boxes), "shared their keys", self.threshold))
            self._u2 = sorted(self._boxes)
            self._stage = 2

    def receive_masked(self, site: str, masked: torch.Tensor) -> None:
        """Stage 2: ``site``'s masked input, int64 of shape (length,) in [0, 2^32). Only
        the running sum is kept."""
        site = _check_name(site, "site")
        self._check_stage(site, 2, "masked input")
        if site not in self._u2:
            raise SecAggError(f"site '{site}': sent a masked input but did not share keys this round", site)
        if site in self._masked:
            raise SecAggError(f"site '{site}': sent its masked input twice", site)
        try:
            check_ring(masked, "masked input", self.length)
        except (TypeError, ValueError) as e:
            raise SecAggError(f"site '{site}': {e}", site) from None
        self._sum.add_(masked.to("cpu")).bitwise_and_(RING - 1)  # mod 2^32
        self._masked.add(site)

    @property
    def survivors(self) -> list[str]:
        """The sites whose masked input arrived (U3), sorted."""
        return sorted(self._masked)

    @property
    def dropped(self) -> list[str]:
        """The U2 sites whose masked input has not arrived, sorted."""
        return sorted(set(self._u2) - self._masked)

    def unmask_request(self) -> dict[str, list[str]]:
        """``{"survivors": U3, "dropped": U2 \\ U3}``, to send to every survivor. The first
        call fixes U3; fewer than t survivors abort the round."""
        self._check_alive()
        self._close_sharing()
        if self._stage == 2:
            if len(self._masked) < self.threshold:
                raise self._abort(_abort(len(self._masked), "sent their masked input", self.threshold))
            self._stage = 3
        if self._stage < 2:
            raise SecAggError("the roster is not fixed yet; no masked input can exist")
        return {"survivors": self.survivors, "dropped": self.dropped}

    def receive_unmask(self, site: str, msg: Mapping[str, Mapping[str, str]]) -> None:
        """Stage 3: ``msg = {"b_shares": {u: share} for u in U3, "s_shares": {v: share}
        for v in U2 \\ U3}`` from a survivor."""
        site = _check_name(site, "site")
        self._check_stage(site, 3, "unmasking answer")
        if site not in self._masked:
            raise SecAggError(f"site '{site}': answered the unmasking but is not a survivor", site)
        if site in self._answers:
            raise SecAggError(f"site '{site}': answered the unmasking twice", site)
        body = _dict(msg, site, "message", ("b_shares", "s_shares"))
        b = _dict(body["b_shares"], site, "b_shares", self.survivors)
        s = _dict(body["s_shares"], site, "s_shares", self.dropped)
        self._answers[site] = (
            {u: _share_y(y, site, f"b_shares.{u}") for u, y in b.items()},
            {v: _share_y(y, site, f"s_shares.{v}") for v, y in s.items()},
        )

    def result(self) -> torch.Tensor:
        """The ring sum of the survivors' inputs: int64, shape (length,), in [0, 2^32).
        The first call closes the unmasking; fewer than t answers abort the round."""
        if self._result is not None:
            return self._result.clone()
        self._check_alive()
        if self._stage != 3:
            raise SecAggError("result() needs the unmasking answers; call unmask_request() first")
        self._stage = 4
        try:
            self._result = self._unmask_sum()
        except SecAggError as e:
            raise self._abort(e) from None
        return self._result.clone()

    def _unmask_sum(self) -> torch.Tensor:
        t = self.threshold
        if len(self._answers) < t:
            raise _abort(len(self._answers), "answered the unmasking", t)
        xs = {v: i + 1 for i, v in enumerate(sorted(self._keys))}
        answerers = sorted(self._answers)
        masks: list[tuple[bytes, int]] = []
        for u in self.survivors:
            b_u = self._reconstruct([(xs[a], self._answers[a][0][u]) for a in answerers], u, "self-mask seed")
            masks.append((b_u, -1))
        for v in self.dropped:
            raw = self._reconstruct([(xs[a], self._answers[a][1][v]) for a in answerers], v, "mask key")
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if s_sk.public_key().public_bytes_raw() != self._keys[v][1]:
                raise SecAggError(f"site '{v}': the shares of its mask key do not match the key it advertised", v)
            for u in self.survivors:
                seed = _kdf(_agree(s_sk, self._keys[u][1], u, "s_pk"), "mask", self.job_id, self.round)
                masks.append((seed, -_sign(u, v)))
        return add_masks(self._sum, masks)

    def _reconstruct(self, shares: list[tuple[int, int]], owner: str, what: str) -> bytes:
        try:
            return shamir.reconstruct(shares, self.threshold, KEY_BYTES)
        except (TypeError, ValueError) as e:
            raise SecAggError(f"site '{owner}': the shares of its {what} do not reconstruct it ({e})", owner) from None


# --- in-memory driver ------------------------------------------------------------------------


def run_round(
    inputs: Mapping[str, torch.Tensor],
    threshold: int,
    drop_before_masking: Iterable[str] = (),
    drop_after_masking: Iterable[str] = (),
    job_id: str = "job",
    rnd: int = 1,
    drop_before_sharing: Iterable[str] = (),
) -> torch.Tensor:
    """One whole round in memory; every message goes through ``json.dumps``/``loads``.

    ``inputs`` maps site to its flat ring vector (all the same length). Sites in
    ``drop_before_sharing`` advertise keys, then vanish; in ``drop_before_masking`` share
    keys but send no masked input (their input is left out); in ``drop_after_masking``
    send their masked input (it is counted) but do not answer the unmasking. Returns the
    ring sum of the counted inputs; raises :class:`SecAggError` when too few remain.

    Example, with ``deltas`` mapping site to a float tensor::

        fp = FixedPoint(clip_range=1.0, max_sites=len(deltas))
        ring = run_round({s: fp.encode(d.flatten()) for s, d in deltas.items()}, threshold=2)
        total = fp.decode_sum(ring)  # float64, the sum of the clipped deltas within len(deltas) * fp.step
    """
    gone = {"drop_before_sharing": set(drop_before_sharing), "drop_before_masking": set(drop_before_masking),
            "drop_after_masking": set(drop_after_masking)}  # fmt: skip
    for name, sites in gone.items():
        if sites - set(inputs):
            raise SecAggError(f"{name}: {sorted(sites - set(inputs))} are not among the inputs' sites")
    if not inputs:
        raise SecAggError("inputs: no sites")
    length = next(iter(inputs.values())).numel()

    def wire(msg: object) -> object:
        return json.loads(json.dumps(msg))

    server = ServerSession(job_id, rnd, threshold, length)
    sites = {v: SiteSession(v, job_id, rnd) for v in sorted(inputs)}
    for v, s in sites.items():
        server.receive_advertisement(v, wire(s.advertise()))
    roster = wire(server.roster())
    for v, s in sites.items():
        if v not in gone["drop_before_sharing"]:
            server.receive_shares(v, wire(s.share_keys(roster, threshold)))
    for v, s in sites.items():
        if v not in gone["drop_before_sharing"] | gone["drop_before_masking"]:
            server.receive_masked(v, s.mask(inputs[v], wire(server.ciphertexts_for(v))))
    request = wire(server.unmask_request())
    for v in server.survivors:
        if v not in gone["drop_after_masking"]:
            server.receive_unmask(v, wire(sites[v].unmask(request["survivors"], request["dropped"])))
    return server.result()
