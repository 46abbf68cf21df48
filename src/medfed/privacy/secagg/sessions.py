"""The two parties of secure aggregation (see protocol.py): a :class:`SiteSession` per site
and a :class:`ServerSession` per round. Their methods take and give the messages as JSON
dicts, the transport's form: each message is parsed into its typed form (messages.py) where
it arrives, and refused with :class:`SecAggError` naming the site and the field."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.privacy.secagg import shamir
from medfed.privacy.secagg.masking import RING, SEED_BYTES, add_masks, check_ring
from medfed.privacy.secagg.messages import (
    KEY_BYTES,
    Advertisement,
    Ciphertexts,
    Roster,
    SealedShares,
    SecAggError,
    SharePackage,
    UnmaskReply,
    UnmaskRequest,
    check_name,
    check_threshold,
)

if TYPE_CHECKING:
    from medfed.privacy.secagg.signing import Credentials

# --- key derivation ------------------------------------------------------------------------------


def _kdf(secret: bytes, purpose: str, job_id: str, rnd: int) -> bytes:
    info = json.dumps(["medfed-secagg-v1", purpose, job_id, rnd]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def _agree(sk: X25519PrivateKey, pk: bytes, site: str, field: str) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise SecAggError(f"site '{site}', field '{field}': not a usable X25519 public key", site) from None


def _sign(u: str, v: str) -> int:
    """The sign of the pairwise mask between u and v in u's masked input."""
    return 1 if u < v else -1


def _abort(k: int, what: str, t: int, site: str | None = None) -> SecAggError:
    prefix = "" if site is None else f"site '{site}': "
    return SecAggError(f"{prefix}only {k} sites {what}, the threshold is {t}; the round is aborted", site)


def _check_round(rnd: object, site: str | None = None) -> int:
    if isinstance(rnd, bool) or not isinstance(rnd, int):
        raise SecAggError(f"rnd: expected an integer, got {rnd!r}", site)
    return rnd


# --- site ------------------------------------------------------------------------------------

_SITE_STEPS = ("none", "advertise()", "share_keys()", "mask()", "unmask()")


class SiteSession:
    """One site's side of one round. Call, once each and in order: :meth:`advertise`,
    :meth:`share_keys`, :meth:`mask`, :meth:`unmask`. Holds this round's secrets (two
    X25519 private keys, the self-mask seed, the shares of other sites' secrets); make a
    new session each round. ``credentials`` (a deployment; signing.py): sign this site's
    advertisement and check every other one; None (a simulation): neither."""

    def __init__(self, site: str, job_id: str, rnd: int, credentials: Credentials | None = None):
        self.site = check_name(site, "site")
        self.job_id = check_name(job_id, "job_id")
        self.round = _check_round(rnd, site)
        if credentials is not None and credentials.site != self.site:
            raise SecAggError(f"site '{self.site}': given the credentials of site '{credentials.site}'", self.site)
        self._credentials = credentials
        self._c_sk = X25519PrivateKey.generate()  # encrypts the shares (c for "channel")
        self._s_sk = X25519PrivateKey.generate()  # seeds the pairwise masks
        self._stage = 0
        self._roster = Roster({})
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

    def _keys(self) -> Advertisement:
        return Advertisement(self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw())

    def advertise(self) -> dict[str, object]:
        """This round's two public keys, ``{"c_pk": b64(32), "s_pk": b64(32)}``; with
        credentials also ``"signed"`` (messages.py :class:`~.messages.Signed`)."""
        self._enter(0, "advertise")
        self._stage = 1
        ad = self._keys()
        if self._credentials is not None:
            ad = self._credentials.sign(ad, self.job_id, self.round)
        return ad.to_wire()

    def share_keys(self, roster: Mapping[str, Mapping[str, str]], threshold: int) -> dict[str, dict[str, str]]:
        """``{"shares": {v: b64 ciphertext}}`` for every other roster site v: t-of-n Shamir
        shares of this site's ``s_sk`` and of a fresh self-mask seed ``b_u``, encrypted
        with AES-GCM under HKDF(X25519(c_sk_u, c_pk_v)), bound to job, round, u and v.

        ``roster`` (U1, the server's broadcast) must list this site with the keys it
        advertised, hold at least ``threshold`` sites and no repeated key; with
        credentials, every advertisement must pass :meth:`.Credentials.check` (else
        SecAggError naming the site and why; this site shares nothing this round)."""
        self._enter(1, "share_keys")
        me = self.site
        parsed = Roster.parse(roster, me)
        if me not in parsed.keys:
            raise SecAggError(f"site '{me}', field 'roster': this site is not in it", me)
        if parsed.keys[me].public_keys != self._keys().public_keys:
            raise SecAggError(f"site '{me}', field 'roster.{me}': not the keys this site advertised", me)
        if self._credentials is not None:  # before any key of the roster is used
            for v in sorted(parsed.keys):
                self._credentials.check(v, parsed.keys[v], self.job_id, self.round)
        all_keys = [k for a in parsed.keys.values() for k in (a.c_pk, a.s_pk)]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError(f"site '{me}', field 'roster': a public key appears twice", me)
        try:
            check_threshold(threshold, len(parsed.keys))
        except SecAggError as e:
            raise SecAggError(f"site '{me}': {e} (roster of {len(parsed.keys)} sites)", me) from None
        names = sorted(parsed.keys)
        self._b_seed = secrets.token_bytes(SEED_BYTES)
        s_shares = shamir.share(self._s_sk.private_bytes_raw(), len(names), threshold)
        b_shares = shamir.share(self._b_seed, len(names), threshold)
        boxes: dict[str, bytes] = {}
        for i, v in enumerate(names):
            if v == me:
                self._held[me] = (s_shares[i][1], b_shares[i][1])
                continue
            key = _kdf(_agree(self._c_sk, parsed.keys[v].c_pk, me, f"roster.{v}.c_pk"), "shares", self.job_id, self.round)
            boxes[v] = SealedShares(me, v, s_shares[i][1], b_shares[i][1]).seal(key, self.job_id, self.round)
        self._roster, self._threshold = parsed, threshold
        self._stage = 2
        return SharePackage(boxes).to_wire()

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
        boxes = Ciphertexts.parse(received, me, self._roster).boxes
        if len(boxes) + 1 < self._threshold:
            raise _abort(len(boxes) + 1, "shared their keys", self._threshold, me)
        held = dict(self._held)
        for u, box in boxes.items():
            key = _kdf(_agree(self._c_sk, self._roster.keys[u].c_pk, me, f"roster.{u}.c_pk"), "shares", self.job_id,
                       self.round)
            shares = SealedShares.open(box, key, self.job_id, self.round, u, me)
            held[u] = (shares.s_sk, shares.b)
        pairs = [(self._b_seed, 1)]
        for v in sorted(boxes):
            seed = _kdf(_agree(self._s_sk, self._roster.keys[v].s_pk, me, f"roster.{v}.s_pk"), "mask", self.job_id,
                        self.round)
            pairs.append((seed, _sign(me, v)))
        y = add_masks(x, pairs)
        self._held, self._u2 = held, frozenset(boxes) | {me}
        self._stage = 3
        return y

    def unmask(self, survivors: list[str], dropped: list[str]) -> dict[str, dict[str, str]]:
        """``{"b_shares": {v: share}, "s_shares": {v: share}}``: this site's shares of the
        self-mask seed of every survivor and of the mask key of every dropped site.

        Refuses when a site is in both lists, when survivors and dropped together are not
        exactly U2, when this site is not a survivor, or when survivors are fewer than the
        threshold. Answers once: a second request could reveal both secrets of a site."""
        self._enter(3, "unmask")
        me = self.site
        request = UnmaskRequest.parse(survivors, dropped, me)
        surv, drop = set(request.survivors), set(request.dropped)
        both = sorted(surv & drop)
        if both:
            raise SecAggError(f"site '{me}': sites {both} are listed as both survivors and dropped", me)
        unknown = sorted((surv | drop) - self._u2)
        if unknown:
            raise SecAggError(f"site '{me}': it holds no share of sites {unknown} (they did not share keys with it)", me)
        missing = sorted(self._u2 - surv - drop)
        if missing:
            raise SecAggError(f"site '{me}': sites {missing} are neither survivors nor dropped", me)
        if me not in surv:
            raise SecAggError(f"site '{me}', field 'survivors': this site sent its masked input but is not listed", me)
        if len(surv) < self._threshold:
            raise SecAggError(
                f"site '{me}': only {len(surv)} survivors, the threshold is {self._threshold}; refusing to unmask", me
            )
        answer = UnmaskReply({v: self._held[v][1] for v in request.survivors},
                             {v: self._held[v][0] for v in request.dropped})
        self._held, self._b_seed = {}, b""  # drop references to what is no longer needed
        self._stage = 4
        return answer.to_wire()


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
        self.job_id = check_name(job_id, "job_id")
        rnd = _check_round(rnd)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise SecAggError(f"threshold: must be an integer >= 2, got {threshold!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise SecAggError(f"length: expected an integer >= 1, got {length!r}")
        self.round, self.threshold, self.length = rnd, threshold, length
        self._stage = 0  # 0 advertising, 1 sharing, 2 masking, 3 unmasking, 4 done
        self._keys: dict[str, Advertisement] = {}  # U1
        self._boxes: dict[str, SharePackage] = {}  # by sender
        self._u2: list[str] = []
        self._sum = torch.zeros(length, dtype=torch.int64)
        self._masked: set[str] = set()  # U3
        self._answers: dict[str, UnmaskReply] = {}  # U4
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
        """Stage 0: ``msg = {"c_pk": b64(32), "s_pk": b64(32)[, "signed": {...}]}`` from
        ``site``; a signature is passed on unchecked (the sites check it)."""
        site = check_name(site, "site")
        self._check_stage(site, 0, "key advertisement")
        if site in self._keys:
            raise SecAggError(f"site '{site}': advertised keys twice", site)
        ad = Advertisement.parse(msg, site)
        for other, known in self._keys.items():
            if {ad.c_pk, ad.s_pk} & {known.c_pk, known.s_pk}:
                raise SecAggError(f"site '{site}': advertised a public key that site '{other}' already uses", site)
        if ad.c_pk == ad.s_pk:
            raise SecAggError(f"site '{site}': advertised the same key as c_pk and s_pk", site)
        self._keys[site] = ad

    def roster(self) -> dict[str, dict[str, str]]:
        """U1 with its keys, ``{site: {"c_pk", "s_pk"}}``, for every site (with
        :attr:`threshold`). The first call fixes it; fewer than t sites abort the round."""
        self._check_alive()
        if self._stage == 0:
            if len(self._keys) < self.threshold:
                raise self._abort(_abort(len(self._keys), "advertised keys", self.threshold))
            self._stage = 1
        return Roster(dict(sorted(self._keys.items()))).to_wire()

    def receive_shares(self, site: str, msg: Mapping[str, Mapping[str, str]]) -> None:
        """Stage 1: ``msg = {"shares": {v: b64}}`` from ``site``, one per other U1 site."""
        site = check_name(site, "site")
        if site not in self._keys:
            raise SecAggError(f"site '{site}': sent key shares but is not in this round's roster", site)
        self._check_stage(site, 1, "key shares")
        if site in self._boxes:
            raise SecAggError(f"site '{site}': sent key shares twice", site)
        self._boxes[site] = SharePackage.parse(msg, site, set(self._keys) - {site})

    def ciphertexts_for(self, site: str) -> dict[str, str]:
        """``{u: b64}``: the ciphertexts addressed to ``site`` by the other U2 sites. The
        first call fixes U2; fewer than t sites abort the round."""
        self._check_alive()
        self._close_sharing()
        if self._stage < 1:
            raise SecAggError(f"site '{site}': the roster is not fixed yet", site)
        if site not in self._u2:
            raise SecAggError(f"site '{site}': did not share its keys in time; it takes no further part in this round", site)
        return Ciphertexts({u: self._boxes[u].boxes[site] for u in self._u2 if u != site}).to_wire()

    def _close_sharing(self) -> None:
        if self._stage == 1:
            if len(self._boxes) < self.threshold:
                raise self._abort(_abort(len(self._boxes), "shared their keys", self.threshold))
            self._u2 = sorted(self._boxes)
            self._stage = 2

    def receive_masked(self, site: str, masked: torch.Tensor) -> None:
        """Stage 2: ``site``'s masked input, int64 of shape (length,) in [0, 2^32). Only
        the running sum is kept."""
        site = check_name(site, "site")
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
        return UnmaskRequest(tuple(self.survivors), tuple(self.dropped)).to_wire()

    def receive_unmask(self, site: str, msg: Mapping[str, Mapping[str, str]]) -> None:
        """Stage 3: ``msg = {"b_shares": {u: share} for u in U3, "s_shares": {v: share}
        for v in U2 \\ U3}`` from a survivor."""
        site = check_name(site, "site")
        self._check_stage(site, 3, "unmasking answer")
        if site not in self._masked:
            raise SecAggError(f"site '{site}': answered the unmasking but is not a survivor", site)
        if site in self._answers:
            raise SecAggError(f"site '{site}': answered the unmasking twice", site)
        self._answers[site] = UnmaskReply.parse(msg, site, self.survivors, self.dropped)

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
            b_u = self._reconstruct([(xs[a], self._answers[a].b_shares[u]) for a in answerers], u, "self-mask seed")
            masks.append((b_u, -1))
        for v in self.dropped:
            raw = self._reconstruct([(xs[a], self._answers[a].s_shares[v]) for a in answerers], v, "mask key")
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if s_sk.public_key().public_bytes_raw() != self._keys[v].s_pk:
                raise SecAggError(f"site '{v}': the shares of its mask key do not match the key it advertised", v)
            for u in self.survivors:
                seed = _kdf(_agree(s_sk, self._keys[u].s_pk, u, "s_pk"), "mask", self.job_id, self.round)
                masks.append((seed, -_sign(u, v)))
        return add_masks(self._sum, masks)

    def _reconstruct(self, shares: list[tuple[int, int]], owner: str, what: str) -> bytes:
        try:
            return shamir.reconstruct(shares, self.threshold, KEY_BYTES)
        except (TypeError, ValueError) as e:
            raise SecAggError(f"site '{owner}': the shares of its {what} do not reconstruct it ({e})", owner) from None
