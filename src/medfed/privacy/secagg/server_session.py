"""The server's side of secure aggregation (see protocol.py): :class:`ServerSession`, one per
round. It collects, routes and checks the sites' messages (each parsed where it arrives,
messages.py) and removes the masks from the sum of the masked inputs.

With a sparse graph (SecAgg+, graph.py) every site sees only its closed neighbourhood:
:meth:`ServerSession.roster_for`, :meth:`ServerSession.ciphertexts_for` and
:meth:`ServerSession.unmask_request_for` give each site its part, and the threshold t
holds within each neighbourhood at every stage."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.privacy.secagg import shamir
from medfed.privacy.secagg.masking import RING, add_masks, check_ring
from medfed.privacy.secagg.messages import (
    KEY_BYTES,
    Advertisement,
    Ciphertexts,
    Roster,
    SecAggError,
    SharePackage,
    UnmaskReply,
    UnmaskRequest,
    check_name,
)
from medfed.privacy.secagg.sessions import _abort, _agree, _check_round, _kdf, _sign

if TYPE_CHECKING:
    from medfed.privacy.secagg.graph import Graph


class ServerSession:
    """The server's side of one round: collects, routes and checks messages, then removes
    the masks from the sum of the masked inputs. It never receives a site's plain ``x``.

    ``threshold`` t (>= 2) is how many sites must remain at every stage (with a ``graph``,
    in every site's closed neighbourhood); ``length`` the number of values in each ring
    vector; ``graph`` (SecAgg+): the round's graph over the drawn sites, None for the
    complete graph over whoever advertises. Each stage closes the first time its outcome
    is asked for (:meth:`roster`, :meth:`ciphertexts_for`, :meth:`unmask_request`,
    :meth:`result`); a message that comes later is refused. The server's caller decides
    when to stop waiting (timeouts) and so who counts as dropped."""

    def __init__(self, job_id: str, rnd: int, threshold: int, length: int, graph: Graph | None = None):
        self.job_id = check_name(job_id, "job_id")
        rnd = _check_round(rnd)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise SecAggError(f"threshold: must be an integer >= 2, got {threshold!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise SecAggError(f"length: expected an integer >= 1, got {length!r}")
        self.round, self.threshold, self.length, self.graph = rnd, threshold, length, graph
        self._stage = 0  # 0 advertising, 1 sharing, 2 masking, 3 unmasking, 4 done
        self._keys: dict[str, Advertisement] = {}  # U1
        self._boxes: dict[str, SharePackage] = {}  # by sender
        self._u2: list[str] = []
        self._sum = torch.zeros(length, dtype=torch.int64)
        self._masked: set[str] = set()  # U3
        self._answers: dict[str, UnmaskReply] = {}  # U4
        self._result: torch.Tensor | None = None
        self._aborted: SecAggError | None = None  # once aborted, every call says why

    # --- neighbourhoods ----------------------------------------------------------------------

    def _near(self, site: str, among: Collection[str], closed: bool = True) -> list[str]:
        """The sites of ``among`` in ``site``'s neighbourhood (with ``site`` when ``closed``), sorted."""
        near = set(among) if self.graph is None else set(among) & self.graph.closed(site)
        return sorted(near if closed else near - {site})

    def _check_enough(self, owners: Collection[str], among: Collection[str], what: str, closed: bool = True) -> None:
        """Abort unless each of ``owners`` has t sites of ``among`` in its neighbourhood."""
        t = self.threshold
        if self.graph is None:
            if len(among) < t:
                raise self._abort(_abort(len(among), what, t))
            return
        for v in sorted(owners):
            near = self._near(v, among, closed)
            if len(near) < t:
                raise self._abort(SecAggError(
                    f"site '{v}': only {len(near)} sites of its neighbourhood {sorted(self.graph.closed(v))} {what} "
                    f"({near}), the threshold is {t}; the round is aborted", v))

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

    # --- stage 0: keys -------------------------------------------------------------------------

    def receive_advertisement(self, site: str, msg: Mapping[str, str]) -> None:
        """Stage 0: ``msg = {"c_pk": b64(32), "s_pk": b64(32)[, "signed": {...}]}`` from
        ``site``; a signature is passed on unchecked (the sites check it)."""
        site = check_name(site, "site")
        self._check_stage(site, 0, "key advertisement")
        if self.graph is not None and site not in self.graph.neighbours:
            raise SecAggError(f"site '{site}': advertised keys but is not a site of this round's graph", site)
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
        """U1 with its keys, ``{site: {"c_pk", "s_pk"}}`` (with the complete graph, what
        every site is sent with :attr:`threshold`). The first call fixes it; fewer than t
        sites (in some site's neighbourhood) abort the round."""
        self._check_alive()
        if self._stage == 0:
            self._check_enough(self._keys, self._keys, "advertised keys")
            self._stage = 1
        return Roster(dict(sorted(self._keys.items()))).to_wire()

    def roster_for(self, site: str) -> dict[str, dict[str, str]]:
        """What ``site`` is sent: the U1 sites of its closed neighbourhood with their keys
        (the whole roster with the complete graph). Fixes U1 like :meth:`roster`."""
        full = self.roster()
        if site not in self._keys:
            raise SecAggError(f"site '{site}': did not advertise keys in time; it takes no part in this round", site)
        return {v: full[v] for v in self._near(site, self._keys)}

    # --- stage 1: shares -----------------------------------------------------------------------

    def receive_shares(self, site: str, msg: Mapping[str, Mapping[str, str]]) -> None:
        """Stage 1: ``msg = {"shares": {v: b64}}`` from ``site``, one per other site of its roster."""
        site = check_name(site, "site")
        if site not in self._keys:
            raise SecAggError(f"site '{site}': sent key shares but is not in this round's roster", site)
        self._check_stage(site, 1, "key shares")
        if site in self._boxes:
            raise SecAggError(f"site '{site}': sent key shares twice", site)
        self._boxes[site] = SharePackage.parse(msg, site, self._near(site, self._keys, closed=False))

    def ciphertexts_for(self, site: str) -> dict[str, str]:
        """``{u: b64}``: the ciphertexts addressed to ``site`` by the other U2 sites (of its
        neighbourhood). The first call fixes U2; fewer than t sites abort the round."""
        self._check_alive()
        self._close_sharing()
        if self._stage < 1:
            raise SecAggError(f"site '{site}': the roster is not fixed yet", site)
        if site not in self._u2:
            raise SecAggError(f"site '{site}': did not share its keys in time; it takes no further part in this round", site)
        return Ciphertexts({u: self._boxes[u].boxes[site] for u in self._near(site, self._u2, closed=False)}).to_wire()

    def _close_sharing(self) -> None:
        if self._stage == 1:
            self._check_enough(self._boxes, self._boxes, "shared their keys")
            self._u2 = sorted(self._boxes)
            self._stage = 2

    # --- stage 2: masked inputs ----------------------------------------------------------------

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

    # --- stage 3: unmasking --------------------------------------------------------------------

    def unmask_request(self) -> dict[str, list[str]]:
        """``{"survivors": U3, "dropped": U2 \\ U3}`` (with the complete graph, what every
        survivor is sent). The first call fixes U3; fewer than t survivors (among the
        holders of some U2 site's shares) abort the round."""
        self._check_alive()
        self._close_sharing()
        if self._stage == 2:
            self._check_enough(self._masked, self._masked, "sent their masked input")
            self._check_enough(self.dropped, self._masked, "sent their masked input", closed=False)
            self._stage = 3
        if self._stage < 2:
            raise SecAggError("the roster is not fixed yet; no masked input can exist")
        return UnmaskRequest(tuple(self.survivors), tuple(self.dropped)).to_wire()

    def unmask_request_for(self, site: str) -> dict[str, list[str]]:
        """What survivor ``site`` is sent: the survivors and the dropped sites whose shares
        it holds (its U2 neighbours and itself). Fixes U3 like :meth:`unmask_request`."""
        request = self.unmask_request()
        if site not in self._masked:
            raise SecAggError(f"site '{site}': is not a survivor of this round", site)
        held = set(self._near(site, self._u2))
        return {k: [v for v in request[k] if v in held] for k in ("survivors", "dropped")}

    def receive_unmask(self, site: str, msg: Mapping[str, Mapping[str, str]]) -> None:
        """Stage 3: ``msg = {"b_shares": {u: share}, "s_shares": {v: share}}`` from a
        survivor, one share for each site of its :meth:`unmask_request_for` lists."""
        site = check_name(site, "site")
        self._check_stage(site, 3, "unmasking answer")
        if site not in self._masked:
            raise SecAggError(f"site '{site}': answered the unmasking but is not a survivor", site)
        if site in self._answers:
            raise SecAggError(f"site '{site}': answered the unmasking twice", site)
        mine = self.unmask_request_for(site)
        self._answers[site] = UnmaskReply.parse(msg, site, mine["survivors"], mine["dropped"])

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
        if self.graph is None and len(self._answers) < t:
            raise _abort(len(self._answers), "answered the unmasking", t)
        masks: list[tuple[bytes, int]] = []
        for u in self.survivors:
            b_u = self._reconstruct(u, lambda a, u=u: self._answers[a].b_shares[u], "self-mask seed")
            masks.append((b_u, -1))
        for v in self.dropped:
            raw = self._reconstruct(v, lambda a, v=v: self._answers[a].s_shares[v], "mask key")
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if s_sk.public_key().public_bytes_raw() != self._keys[v].s_pk:
                raise SecAggError(f"site '{v}': the shares of its mask key do not match the key it advertised", v)
            for u in self._near(v, self._masked, closed=False):
                seed = _kdf(_agree(s_sk, self._keys[u].s_pk, u, "s_pk"), "mask", self.job_id, self.round)
                masks.append((seed, -_sign(u, v)))
        return add_masks(self._sum, masks)

    def _reconstruct(self, owner: str, share_of, what: str) -> bytes:
        """``owner``'s secret from the answers of its shareholders; a share's x is 1 + the
        holder's index in the roster ``owner`` was sent."""
        xs = {v: i + 1 for i, v in enumerate(self._near(owner, self._keys))}
        answerers = self._near(owner, self._answers)
        if len(answerers) < self.threshold:
            raise SecAggError(f"site '{owner}': only {len(answerers)} holders of its {what}'s shares answered the "
                              f"unmasking ({answerers}), the threshold is {self.threshold}; the round is aborted", owner)
        try:
            return shamir.reconstruct([(xs[a], share_of(a)) for a in answerers], self.threshold, KEY_BYTES)
        except (TypeError, ValueError) as e:
            raise SecAggError(f"site '{owner}': the shares of its {what} do not reconstruct it ({e})", owner) from None
