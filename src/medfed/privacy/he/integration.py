"""Homomorphic aggregation on the update path, carried by any transport that carries the
update-path messages (server: :class:`EncryptedSum`, site: :class:`HEClient`).

Round r, for the sites drawn S:

1. ``prepare``: the server sends each site of S it has not checked yet the fingerprint of
   its public context (``he/check``); a site whose own context has another fingerprint
   refuses, naming both, and the server leaves out the updates of every site it could not
   match (their ciphertexts would add as noise to the others').
2. ``fit``: site i trains, takes its change ``n_i * (params - global)`` over every
   floating-point entry it sends, flattened by name (``n_i``: its training examples, sent
   in clear as the update's ``num_examples``, as plain FedAvg does), encrypts it in chunks
   of N/2 values and sends one uint8 tensor ``he#ciphertexts`` of shape
   (chunks, ciphertext bytes): TenSEAL's serialization, whose exact size the server
   checks (the update's spec) before any byte is parsed.
3. ``combine``: the server deserializes each site's ciphertexts with its public context
   (no secret key) and adds them. With at least 2 contributors it sends the encrypted sum
   and the contributors' names to ``decryptors`` of them (``he/decrypt``), rotating by
   round; each returns the plaintext sum (float64, little-endian, base64). Several
   decryptors must agree bit for bit. The server divides by ``sum(n_i)``: the weighted mean
   change, added to the global model.

What each party learns: the server, the weighted sum of the round's changes (so the mean,
as with secure aggregation) and every ``n_i``; a decrypting site, that same sum (the next
global model tells every site the mean anyway). Every site holds the secret key: a server
that colludes with any one site, or that sends one site's ciphertext to a decryptor as if it
were the sum, learns that site's update (docs/privacy.md).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from medfed.algorithms.base import Combiner
from medfed.config import Job
from medfed.core.errors import ConfigError, SiteError
from medfed.core.types import (
    Encoding,
    Message,
    Params,
    RoundPlan,
    SecAggPlan,
    SiteFailure,
    Spec,
    Update,
)
from medfed.privacy.base import ProtocolParty, UpdateFilter
from medfed.privacy.he import ckks
from medfed.privacy.he.ckks import HEError
from medfed.privacy.settings import HomomorphicEncryption

if TYPE_CHECKING:
    import tenseal as ts

log = logging.getLogger("medfed")

CIPHERTEXTS = "he#ciphertexts"  # the one tensor of an encrypted update
TOPICS = frozenset({"he/check", "he/decrypt"})


def summed(sent: Params) -> list[str]:
    """The entries whose change is encrypted, in the one order both sides use: the
    floating-point ones, by name. Integer buffers stay out (the global model keeps its own)."""
    return sorted(k for k, t in sent.items() if t.is_floating_point())


def value_count(sent: Params) -> int:
    return sum(sent[k].numel() for k in summed(sent))


def encrypted_spec(sent: Params, settings: HomomorphicEncryption) -> Spec:
    """An encrypted update: (chunks, ciphertext bytes) uint8, sizes fixed by the model and
    ``privacy.he``."""
    return {CIPHERTEXTS: ((ckks.chunks(value_count(sent), settings), ckks.ciphertext_bytes(settings)), torch.uint8)}


def simulation_key(job: Job) -> str:
    """Names the simulated consortium key of ``job`` (its hash and seed)."""
    return f"{job.job_hash()[:24]}-{job.seed}"


def server_combiner(job: Job, deployment: bool, exchange, local_keys: frozenset[str],
                    context: ts.Context | None = None) -> EncryptedSum:
    """The server's combiner, with the public context only: ``context`` (a deployment: the
    consortium's ``he-public.ctx``, read by ``medfed server --he-context``), else a
    simulation's, from the key the simulated sites share."""
    if context is None:
        if deployment:
            raise ConfigError("privacy.he: a deployed server needs the consortium's public context: "
                              "medfed server --he-context he-public.ctx (written by medfed he-keys)")
        context = ckks.simulation_public(simulation_key(job), job.privacy.he)
    return EncryptedSum(job, exchange, context, local_keys)


def site_client(job: Job, site: str, secure: bool, context: ts.Context | None = None) -> HEClient:
    """A site's filter, with the consortium's secret context: ``context`` (a deployment: the
    ``he-secret.ctx`` given to ``medfed site --he-context``), else a simulation's."""
    if context is None:
        if secure:
            raise ConfigError(f"privacy.he: site '{site}' needs the consortium's secret context: medfed site "
                              "--he-context he-secret.ctx (written by medfed he-keys, given to every site)")
        context = ckks.simulation_context(simulation_key(job), job.privacy.he)
    return HEClient(job, site, context)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, limit: int, what: str, site: str | None = None) -> bytes:
    """Base64 ``text`` decoded, refused before decoding when it would exceed ``limit`` bytes."""
    if not isinstance(text, str) or len(text) > 4 * (-(-limit // 3)):
        raise HEError(f"{what}: must be base64 text of at most {limit} bytes", site)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HEError(f"{what}: not base64 ({e})", site) from e


# --------------------------------------------------------------------------- site side


class HEClient(UpdateFilter, ProtocolParty):
    """A site's part: encrypts its weighted change, answers the context check and decrypts
    sums. ``context``: the consortium's context with the secret key."""

    topics = TOPICS

    def __init__(self, job: Job, site: str, context):
        if not context.is_private():
            raise HEError(f"site '{site}': homomorphic aggregation needs the consortium's secret context", site)
        self.site = site
        self.settings = job.privacy.he
        self.members = frozenset(job.site_names)
        self.k = job.sites_per_round
        self.context = context
        self.fingerprint = ckks.fingerprint(context)
        self._last: tuple[int, int] | None = None  # (round, values) of the last update encrypted

    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        if update.encoding is not Encoding.FULL:
            raise ValueError(f"homomorphic encryption encrypts full updates, got '{update.encoding.value}'")
        reference = {k: v for k, v in global_params.items() if k in update.params}
        if reference.keys() != update.params.keys():
            raise SiteError(self.site, "homomorphic aggregation: the update's tensors differ from the model's")
        names = summed(reference)
        change = torch.cat([(update.params[k].double() - reference[k].double()).reshape(-1) for k in names])
        weighted = change.cpu().numpy() * float(update.num_examples)
        room = ckks.headroom(self.settings) / self.k
        peak = float(np.abs(weighted).max()) if weighted.size else 0.0
        if not peak <= room:  # the sum of k such changes could wrap around the data prime
            raise SiteError(self.site, (
                f"privacy.he.scale_bits: this site's weighted change reaches {peak:.3g}, more than the "
                f"{room:.3g} that {self.k} sites' sum leaves room for at scale 2^{self.settings.scale_bits}; "
                "lower scale_bits"))
        rows = ckks.encrypt(self.context, weighted, self.settings)
        self._last = (plan.round, weighted.size)
        return replace(update, params={CIPHERTEXTS: torch.from_numpy(rows)}, encoding=Encoding.ENCRYPTED)

    def answer(self, topic: str, rnd: int, body: dict) -> dict:
        if topic == "he/check":
            theirs = body.get("fingerprint")
            if theirs != self.fingerprint:
                raise SiteError(self.site, (
                    f"privacy.he: the server's context has fingerprint {theirs!r}, this site's {self.fingerprint!r}: "
                    "they are not one consortium key; give the server the he-public.ctx written with this site's "
                    "he-secret.ctx"))
            return {"fingerprint": self.fingerprint}
        if topic == "he/decrypt":
            return self._decrypt(rnd, body)
        raise SiteError(self.site, f"homomorphic aggregation: unknown message '{topic}'")

    def _decrypt(self, rnd: int, body: dict) -> dict:
        sites = body.get("sites")
        if not isinstance(sites, list) or len(set(sites)) < 2 or not set(sites) <= self.members:
            raise HEError(f"site '{self.site}': decrypts only a sum of at least 2 of the job's sites, "
                          f"got sites {sites!r}", self.site)
        if self._last is None or self._last[0] != rnd or self.site not in sites:
            raise HEError(f"site '{self.site}': decrypts only the sum of a round it sent an update to "
                          f"(round {rnd})", self.site)
        n_values = self._last[1]
        n_chunks, size = ckks.chunks(n_values, self.settings), ckks.ciphertext_bytes(self.settings)
        parts = body.get("sum")
        if not isinstance(parts, list) or len(parts) != n_chunks:
            raise HEError(f"site '{self.site}': the sum must be {n_chunks} ciphertexts", self.site)
        rows = np.empty((n_chunks, size), dtype=np.uint8)
        for i, part in enumerate(parts):
            raw = _unb64(part, size, f"sum[{i}]", self.site)
            if len(raw) != size:
                raise HEError(f"site '{self.site}': ciphertext {i} of the sum is {len(raw)} bytes, expected {size}",
                              self.site)
            rows[i] = np.frombuffer(raw, dtype=np.uint8)
        vectors = ckks.read_ciphertexts(self.context, rows, n_chunks, self.settings, self.site)
        plain = ckks.decrypt(self.context, vectors, n_values)
        return {"sum": _b64(plain.astype("<f8").tobytes())}


# --------------------------------------------------------------------------- server side


class EncryptedSum(Combiner):
    """The server's part: checks the sites' context fingerprints, adds their ciphertexts
    and has decryptors open the sum; the weighted mean of the contributors' changes.

    ``exchange``: the transport; ``context``: the public context (refused if it holds a
    secret key); ``local_keys``: entries that stay at the sites."""

    name = "encrypted_sum"

    def __init__(self, job: Job, exchange, context, local_keys: frozenset[str] = frozenset()):
        if context.is_private():
            raise HEError("the server's context holds a secret key; give it the public context only")
        self.job_id = job.job_id
        self.transport = exchange
        self.timeout = job.round_timeout
        self.settings = job.privacy.he
        self.context = context
        self.fingerprint = ckks.fingerprint(context)
        self.local_keys = local_keys
        self._matched: set[str] = set()
        self._contributors = 0

    def _send(self, rnd: int, topic: str, bodies: dict[str, dict]) -> dict[str, dict]:
        msgs = [Message(site=s, job_id=self.job_id, round=rnd, topic=topic, body=b) for s, b in bodies.items()]
        replies = {}
        for m, r in zip(msgs, self.transport.exchange(msgs, timeout=self.timeout)):
            if isinstance(r, SiteFailure):
                log.warning("federated round %d: site '%s' failed homomorphic aggregation at %s: %s",
                            rnd, m.site, topic, r.cause)
            else:
                replies[m.site] = r
        return replies

    def prepare(self, rnd: int, sites: Sequence[str], global_params: Params) -> dict[str, SecAggPlan]:
        new = [s for s in sites if s not in self._matched]
        if new:
            replies = self._send(rnd, "he/check", {s: {"fingerprint": self.fingerprint} for s in new})
            for site, reply in replies.items():
                theirs = reply.get("fingerprint") if isinstance(reply, dict) else None
                if theirs == self.fingerprint:
                    self._matched.add(site)
                else:
                    log.error("federated round %d: site '%s' has HE context fingerprint %r, the server's is %r; "
                              "its updates are refused", rnd, site, theirs, self.fingerprint)
        return {}

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        sent = {k: v for k, v in global_params.items() if k not in self.local_keys}
        n_values = value_count(sent)
        n_chunks = ckks.chunks(n_values, self.settings)
        total, contributors, examples = None, [], 0
        for u in updates:
            try:
                if u.encoding is not Encoding.ENCRYPTED:
                    raise HEError("sent an unencrypted update under homomorphic aggregation", u.site)
                if u.site not in self._matched:
                    raise HEError("its HE context was not matched to the server's (he/check)", u.site)
                rows = u.params[CIPHERTEXTS]
                if rows.dtype != torch.uint8:
                    raise HEError(f"ciphertexts must be uint8, got {rows.dtype}", u.site)
                vectors = ckks.read_ciphertexts(self.context, rows.numpy(), n_chunks, self.settings, u.site)
                total = ckks.add_into(total, vectors, u.site)
            except HEError as e:
                log.warning("federated round %d: site '%s' left homomorphic aggregation: %s", rnd, u.site, e)
                continue
            contributors.append(u.site)
            examples += u.num_examples
        if len(contributors) < 2:  # the "sum" of one site is its update: never decrypted
            raise HEError(f"round {rnd}: {len(contributors)} site(s) contributed ciphertexts; homomorphic "
                          "aggregation decrypts sums of 2 or more")
        self._contributors = len(contributors)
        plain = self._open(rnd, total, contributors, n_values)
        mean = torch.from_numpy(plain / examples)
        out, at = {}, 0
        for k in summed(sent):
            ref = sent[k]
            out[k] = (ref.double() + mean[at: at + ref.numel()].reshape(ref.shape)).to(ref.dtype)
            at += ref.numel()
        return out

    def _open(self, rnd: int, total: list, contributors: list[str], n_values: int) -> np.ndarray:
        """The plaintext of ``total`` from ``decryptors`` of the contributors (rotating by
        round, the next ones standing in for any that fail); several must agree exactly."""
        body = {"sites": contributors, "sum": [_b64(v.serialize()) for v in total]}
        start = rnd % len(contributors)
        order = contributors[start:] + contributors[:start]
        want = min(self.settings.decryptors, len(order))
        answers: dict[str, np.ndarray] = {}
        while order and len(answers) < want:
            ask, order = order[: want - len(answers)], order[want - len(answers):]
            for site, reply in self._send(rnd, "he/decrypt", {s: body for s in ask}).items():
                try:
                    raw = _unb64(reply.get("sum"), 8 * n_values, "sum", site)
                    if len(raw) != 8 * n_values:
                        raise HEError(f"sum: {len(raw)} bytes, expected {8 * n_values}", site)
                    values = np.frombuffer(raw, dtype="<f8").astype(np.float64)
                    if not np.isfinite(values).all():
                        raise HEError("sum: holds NaN or Inf", site)
                except HEError as e:
                    log.warning("federated round %d: site '%s' sent an unusable decryption: %s", rnd, site, e)
                    continue
                answers[site] = values
        if len(answers) < want:
            raise HEError(f"round {rnd}: {len(answers)} of the {want} decryptor(s) answered")
        first, *rest = answers.items()
        for site, values in rest:
            if not np.array_equal(values, first[1]):
                raise HEError(f"round {rnd}: decryptors '{first[0]}' and '{site}' returned different sums")
        return first[1]

    def round_metrics(self) -> dict[str, float]:
        return {"he_contributors": float(self._contributors)}
