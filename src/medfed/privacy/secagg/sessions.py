"""The two parties of secure aggregation (see protocol.py): a :class:`SiteSession` per site
(here, with the key derivation both share) and a :class:`~.server_session.ServerSession`
per round (server_session.py). Their methods take and give the messages as JSON dicts, the
transport's form: each message is parsed into its typed form (messages.py) where it
arrives, and refused with :class:`SecAggError` naming the site and the field."""

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
from medfed.privacy.secagg.masking import SEED_BYTES, add_masks, check_ring
from medfed.privacy.secagg.messages import (
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
    from medfed.privacy.secagg.graph import Graph
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
    advertisement and check every other one; None (a simulation): neither. ``graph``
    (SecAgg+, graph.py): this round's graph, which the site computed itself; the roster
    it is sent may then hold only its neighbours. None: the complete graph."""

    def __init__(self, site: str, job_id: str, rnd: int, credentials: Credentials | None = None,
                 graph: Graph | None = None):
        self.site = check_name(site, "site")
        self.job_id = check_name(job_id, "job_id")
        self.round = _check_round(rnd, site)
        if credentials is not None and credentials.site != self.site:
            raise SecAggError(f"site '{self.site}': given the credentials of site '{credentials.site}'", self.site)
        self._credentials = credentials
        if graph is not None and self.site not in graph.neighbours:
            raise SecAggError(f"site '{self.site}': not a site of this round's graph {list(graph.sites)}", self.site)
        self._graph = graph
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

        ``roster`` (U1, the server's broadcast; with a sparse graph the U1 sites of this
        site's closed neighbourhood, and no other) must list this site with the keys it
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
        if self._graph is not None:  # the server routes; the seeded graph, not the server, picks neighbours
            strangers = sorted(set(parsed.keys) - self._graph.closed(me))
            if strangers:
                raise SecAggError(
                    f"site '{me}', field 'roster': sites {strangers} are not its neighbours in this round's seeded "
                    f"graph (its neighbours: {sorted(self._graph.neighbours[me])}); refusing the neighbour list", me)
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
        exactly the U2 sites it holds shares of (U2, or with a sparse graph its U2
        neighbours and itself), when this site is not a survivor, or when those survivors
        are fewer than the threshold. Answers once: a second request could reveal both secrets of a site."""
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
