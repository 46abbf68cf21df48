"""Secure aggregation on the update path: the protocol of protocol.py carried by any
transport (in-process, process pool, gRPC), one session per round.

Round r, for the sites drawn S (server: :class:`SecureSum`, site: :class:`SecAggClient`):

1. ``prepare``: the server asks every site of S for fresh public keys
   (``secagg/advertise``), fixes the roster, sends it back and collects the encrypted
   Shamir shares (``secagg/share``). Each site's fit plan then carries the shares
   addressed to it and its weight ``w_i`` (its share of the roster's training examples,
   or ``1/|roster|`` under DP, which weighs sites equally).
2. ``fit``: the site trains, computes its change ``w_i * (params - global)`` over every
   floating-point entry it sends, flattened by name, encodes it in the ring (coordinates
   clipped to ``clip_range``) and masks it. The update holds one int32 tensor,
   ``secagg#masked`` (the ring's 32 bits); the server never sees a site's change.
3. ``combine``: the server adds the masked vectors, asks the survivors for the shares
   of the dropped sites' keys and of the survivors' self-masks (``secagg/unmask``),
   removes the masks and divides by the survivors' total weight: the weighted mean of
   the survivors' changes. With central DP it adds the noise to that mean.

Fewer survivors than the threshold abort the round (a RoundError). Keys and masks come
from the OS; the stochastic rounding is seeded from the round's training seed, so a
deployment computes exactly what its simulation does. In a deployment each site's
:class:`SecAggClient` has its kit's :class:`~.signing.Credentials`: it signs its keys and
refuses a roster with a key it cannot verify (signing.py); the server passes the
signatures on and checks none.

With ``graph: sparse`` (SecAgg+, graph.py) the advertise request also names the round's
drawn sites; each site checks them against the job, computes the round's seeded graph
itself and refuses a roster with a site that is not its neighbour. Each site is then
sent its neighbourhood's roster and unmasking lists only (server_session.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from medfed.algorithms.base import Combiner
from medfed.config import Job
from medfed.core.errors import SiteError
from medfed.core.types import Encoding, Message, Metric, Params, RoundPlan, SecAggPlan, SiteFailure, Spec, Update
from medfed.privacy.base import ProtocolParty, UpdateFilter
from medfed.privacy.secagg.graph import Graph, round_graph
from medfed.privacy.secagg.masking import FixedPoint
from medfed.privacy.secagg.protocol import SecAggError, ServerSession, SiteSession
from medfed.privacy.settings import SiteLevelDP
from medfed.transport.base import Transport

if TYPE_CHECKING:
    from medfed.privacy.secagg.signing import Credentials

log = logging.getLogger("medfed")

MASKED = "secagg#masked"  # the one tensor of a masked update
TOPICS = frozenset({"secagg/advertise", "secagg/share", "secagg/unmask"})


def summed(sent: Params) -> list[str]:
    """The entries whose change is summed, in the one order both sides use: the
    floating-point ones, by name (a payload's order is not the model's after a codec).
    Integer buffers (batch-norm step counters) are not summed: the global model keeps its
    own, as nothing of one site may reach the server outside the masked sum."""
    return sorted(k for k, t in sent.items() if t.is_floating_point())


def masked_spec(sent: Params) -> Spec:
    """A masked update: one flat vector as long as every summed entry together, its ring
    values (in [0, 2^32)) carried in int32 (two's complement) so that it weighs what the
    float32 change would."""
    return {MASKED: ((sum(sent[k].numel() for k in summed(sent)),), torch.int32)}


def to_wire(ring: torch.Tensor) -> torch.Tensor:
    """Ring values (int64 in [0, 2^32)) as int32 with the same 32 bits."""
    return torch.where(ring >= 2**31, ring - 2**32, ring).to(torch.int32)


def from_wire(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_wire`: int64 in [0, 2^32)."""
    return packed.to(torch.int64) & 0xFFFFFFFF


def flat_change(params: Params, reference: Params) -> torch.Tensor:
    """``params - reference`` over the summed entries of ``reference``, flat float64."""
    return torch.cat([(params[k].to(torch.float64) - reference[k].to(torch.float64)).reshape(-1)
                      for k in summed(reference)])


def _unflatten(flat: torch.Tensor, reference: Params) -> Params:
    """``reference + flat`` per summed entry, in the reference dtypes."""
    out, at = {}, 0
    for k in summed(reference):
        ref = reference[k]
        n = ref.numel()
        out[k] = (ref.to(torch.float64) + flat[at : at + n].reshape(ref.shape)).to(ref.dtype)
        at += n
    return out


def _rounding_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- site side


class SecAggClient(UpdateFilter, ProtocolParty):
    """A site's part: answers the key exchange and unmasking, masks its update.
    ``credentials``: the site's kit (a deployment), to sign its keys and check the others'."""

    topics = TOPICS

    def __init__(self, job: Job, site: str, credentials: Credentials | None = None):
        self.site = site
        self.members = frozenset(job.site_names)
        self.credentials = credentials
        self.neighbours = job.secagg_neighbours  # None: the complete graph
        self.per_round = job.sites_per_round
        self.threshold = job.secagg_threshold
        sa = job.privacy.secure_aggregation
        self.codec = FixedPoint(sa.clip_range, job.sites_per_round)
        self._session: SiteSession | None = None
        self._round = 0

    def _current(self, rnd: int) -> SiteSession:
        if self._session is None or self._round != rnd:
            raise SiteError(self.site, f"secure aggregation: no key exchange for round {rnd} (was it dropped?)")
        return self._session

    def answer(self, topic: str, rnd: int, body: dict) -> dict:
        if topic == "secagg/advertise":  # a new round: fresh keys, the last round's session is gone
            self._session = None
            job_id = str(body.get("job_id"))
            graph = None if self.neighbours is None else self._graph(body.get("sites"), job_id, rnd)
            self._session = SiteSession(self.site, job_id, rnd, self.credentials, graph)
            self._round = rnd
            return self._session.advertise()
        if topic == "secagg/share":
            threshold, roster = body.get("threshold"), body.get("roster")
            if isinstance(threshold, bool) or not isinstance(threshold, int):
                raise SecAggError(f"site '{self.site}': threshold must be an integer, got {threshold!r}", self.site)
            if self.neighbours is not None and threshold != self.threshold:  # SecAgg+: t counts per neighbourhood
                raise SecAggError(f"site '{self.site}', field 'threshold': is {threshold}, but the job's is "
                                  f"{self.threshold}", self.site)
            strangers = sorted(set(roster) - self.members) if isinstance(roster, Mapping) else []
            if strangers:
                raise SecAggError(f"site '{self.site}', field 'roster': sites {strangers} are not sites of this job",
                                  self.site)
            return self._current(rnd).share_keys(roster, threshold)
        if topic == "secagg/unmask":
            survivors, dropped = body.get("survivors"), body.get("dropped")
            reply = self._current(rnd).unmask(survivors, dropped)
            self._session = None  # the round is over for this site
            return reply
        raise SiteError(self.site, f"secure aggregation: unknown message '{topic}'")

    def _graph(self, sites: object, job_id: str, rnd: int) -> Graph:
        """This round's graph over the drawn ``sites`` the server named, checked first:
        this site among them, only sites of the job, at most its sites per round."""
        where = f"site '{self.site}', field 'sites'"
        if not isinstance(sites, list) or not all(isinstance(v, str) for v in sites) or len(set(sites)) != len(sites):
            raise SecAggError(f"{where}: expected the round's drawn sites, a list of distinct names", self.site)
        if self.site not in sites:
            raise SecAggError(f"{where}: this site is not among them", self.site)
        strangers = sorted(set(sites) - self.members)
        if strangers:
            raise SecAggError(f"{where}: sites {strangers} are not sites of this job", self.site)
        if len(sites) > self.per_round:
            raise SecAggError(f"{where}: {len(sites)} sites, but the job draws {self.per_round} per round", self.site)
        return round_graph(sites, self.neighbours, job_id, rnd)  # type: ignore[arg-type]

    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        if update.encoding is not Encoding.FULL:
            raise ValueError(f"secure aggregation masks full updates, got '{update.encoding.value}'")
        info = plan.secagg
        if info is None:
            raise SiteError(self.site, f"secure aggregation: not in the roster of round {plan.round}")
        weight = info.weight
        if not 0 < weight <= 1:
            raise SiteError(self.site, f"secure aggregation: weight must be in (0, 1], got {weight!r}")
        reference = {k: v for k, v in global_params.items() if k in update.params}
        if reference.keys() != update.params.keys():
            raise SiteError(self.site, "secure aggregation: the update's tensors differ from the model's")
        change = flat_change(update.params, reference) * float(weight)
        x = self.codec.encode(change, _rounding_generator(plan.train.seed))
        masked = self._current(plan.round).mask(x, info.ciphertexts)
        return replace(update, params={MASKED: to_wire(masked)}, encoding=Encoding.MASKED)


# --------------------------------------------------------------------------- server side


class SecureSum(Combiner):
    """The server's part: drives the key exchange before the fit and the unmasking after
    it; combines the masked updates into the survivors' weighted mean change.

    ``exchange``: the transport (its ``exchange`` method carries the messages);
    ``train_sizes``: training examples per site (the weights); ``central``: the job's
    central DP settings (the server adds their noise to the mean), or None;
    ``noise_seed``: as for :class:`~medfed.privacy.dp.CentralDP`."""

    name = "secure_sum"

    def __init__(self, job: Job, exchange: Transport, train_sizes: dict[str, int], central: SiteLevelDP | None = None,
                 noise_seed: int | None = None, local_keys: frozenset[str] = frozenset()):
        self.job_id = job.job_id
        self.transport = exchange
        self.timeout = job.round_timeout
        self.threshold = job.secagg_threshold
        self.neighbours = job.secagg_neighbours  # None: the complete graph
        self.codec = FixedPoint(job.privacy.secure_aggregation.clip_range, job.sites_per_round)
        self.sizes = dict(train_sizes)
        self.central = central
        self.noise_seed = noise_seed
        self.local_keys = local_keys  # entries that stay at the sites (FedBN, FedPer, FedRep)
        self._session: ServerSession | None = None
        self._weights: dict[str, float] = {}
        self._survivors = 0

    def _send(self, rnd: int, topic: str, bodies: dict[str, dict]) -> dict[str, dict]:
        """Send one message per site; the replies of those that answered (others logged)."""
        msgs = [Message(site=s, job_id=self.job_id, round=rnd, topic=topic, body=b) for s, b in bodies.items()]
        replies = {}
        for m, r in zip(msgs, self.transport.exchange(msgs, timeout=self.timeout)):
            if isinstance(r, SiteFailure):
                log.warning("federated round %d: site '%s' left secure aggregation at %s: %s", rnd, m.site, topic, r.cause)
            else:
                replies[m.site] = r
        return replies

    def _receive(self, rnd: int, step: str, replies: dict[str, dict], take) -> None:
        for site, reply in replies.items():
            try:
                take(site, reply)
            except SecAggError as e:  # one bad message drops that site, not the round
                log.warning("federated round %d: site '%s' left secure aggregation at %s: %s", rnd, site, step, e)

    def prepare(self, rnd: int, sites: Sequence[str], global_params: Params) -> dict[str, SecAggPlan]:
        sent = self._sent(global_params)
        ask: dict[str, object] = {"job_id": self.job_id}
        graph = None
        if self.neighbours is not None:  # SecAgg+: the sites recompute the graph from the drawn sites
            ask["sites"] = sorted(sites)
            graph = round_graph(sites, self.neighbours, self.job_id, rnd)
        session = ServerSession(self.job_id, rnd, self.threshold, masked_spec(sent)[MASKED][0][0], graph)
        self._session = session
        ads = self._send(rnd, "secagg/advertise", {s: dict(ask) for s in sites})
        self._receive(rnd, "advertise", ads, session.receive_advertisement)
        roster = session.roster()  # fewer than the threshold: SecAggError, the round is aborted
        shares = self._send(rnd, "secagg/share", {s: {"roster": session.roster_for(s), "threshold": self.threshold}
                                                  for s in roster})
        self._receive(rnd, "share", shares, session.receive_shares)
        members = sorted(shares)
        if self.central is not None:  # DP: every site weighs the same, so each one's share is bounded
            self._weights = {s: 1.0 / len(members) for s in members}
        else:
            total = sum(self.sizes.get(s, 0) for s in members)
            if total <= 0:
                raise SecAggError(f"round {rnd}: the sites of the roster reported no training examples")
            self._weights = {s: self.sizes.get(s, 0) / total for s in members}
        return {s: SecAggPlan(self._weights[s], session.ciphertexts_for(s)) for s in members if self._weights[s] > 0}

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        session = self._session
        if session is None:
            raise SecAggError(f"round {rnd}: no key exchange took place")
        for u in updates:
            if u.encoding is not Encoding.MASKED:
                raise SecAggError(f"site '{u.site}': sent an unmasked update under secure aggregation", u.site)
            try:
                session.receive_masked(u.site, from_wire(u.params[MASKED]))
            except SecAggError as e:
                log.warning("federated round %d: site '%s' left secure aggregation: %s", rnd, u.site, e)
        request = session.unmask_request()  # fewer survivors than the threshold: the round is aborted
        replies = self._send(rnd, "secagg/unmask", {s: session.unmask_request_for(s) for s in request["survivors"]})
        self._receive(rnd, "unmask", replies, session.receive_unmask)
        total = self.codec.decode_sum(session.result())
        self._session = None
        survivors = request["survivors"]
        self._survivors = len(survivors)
        mean = total / sum(self._weights[s] for s in survivors)
        if self.central is not None:
            mean = mean + self._noise(mean.numel(), len(survivors), rnd)
        return _unflatten(mean, self._sent(global_params))

    def _sent(self, global_params: Params) -> Params:
        return {k: v for k, v in global_params.items() if k not in self.local_keys}

    def _noise(self, n: int, m: int, rnd: int) -> torch.Tensor:
        """Central DP's Gaussian noise on the mean of m changes each clipped (at the
        sites) to the bound: std ``noise_multiplier * clip / m`` per coordinate."""
        from medfed.privacy.dp import central_noise_std
        from medfed.privacy.noise import noise_source

        std = central_noise_std(self.central.noise_multiplier, self.central.clip, m)
        # noise_seed None (a deployment): a cryptographic generator, else repeatable
        return noise_source(self.noise_seed, rnd, 0x5EC).normal((n,), torch.float64) * std

    def round_metrics(self) -> dict[str, float]:
        out = {"secagg_survivors": float(self._survivors)}
        if self.central is not None:
            out[Metric.CLIP] = float(self.central.clip)
        return out
