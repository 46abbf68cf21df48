"""The server's half of the update path, built from the job: what an update must look like
(its encoding and :data:`~medfed.core.types.Spec`), how it is decoded, which
:class:`~medfed.algorithms.base.Combiner` replaces the weighted mean, and the privacy
ledger that says each round's epsilon and when the budget stops training.

The site's half (attack simulation, DP, compression, masking) is site/update_path.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from medfed.algorithms.base import Combiner, WeightedMean
from medfed.config import Job
from medfed.core.errors import ConfigError
from medfed.core.types import Encoding, Params, Spec, Update
from medfed.privacy.settings import HomomorphicEncryption
from medfed.server.validate import full_spec

if TYPE_CHECKING:
    import tenseal as ts

log = logging.getLogger("medfed")


@dataclass(frozen=True)
class UpdateFormat:
    """What the sites' federated updates are encoded as, and how to read them back."""

    encoding: Encoding = Encoding.FULL
    fraction: float | None = None  # top-k's share of entries
    buffers: frozenset[str] = frozenset()  # the model's buffers: compression sends them whole
    he: HomomorphicEncryption | None = None  # privacy.he: fixes the ciphertexts' count and size

    def spec(self, global_params: Params, local_keys: frozenset[str] = frozenset()) -> Spec:
        """Names, shapes and dtypes every update of the round must have."""
        if self.encoding is Encoding.FULL:
            return full_spec(global_params, local_keys)
        sent = {k: v for k, v in global_params.items() if k not in local_keys}
        if self.encoding is Encoding.MASKED:
            from medfed.privacy.secagg.integration import masked_spec

            return masked_spec(sent)
        if self.encoding is Encoding.ENCRYPTED:
            from medfed.privacy.he.integration import encrypted_spec

            return encrypted_spec(sent, self.he)
        from medfed.privacy.compression import wire_spec

        return wire_spec(sent, self.encoding, self.fraction, self.buffers)

    def decode(self, update: Update, global_params: Params, local_keys: frozenset[str] = frozenset()) -> Update:
        """``update`` with full values (unchanged when full, masked or encrypted: only the
        secure sum can be read). Raises CodecError for values that do not decode."""
        if self.encoding in (Encoding.FULL, Encoding.MASKED, Encoding.ENCRYPTED):
            return update
        from medfed.privacy.compression import decode

        sent = {k: v for k, v in global_params.items() if k not in local_keys}
        full = decode(update.params, sent, self.encoding, self.fraction, self.buffers)
        return replace(update, params=full, encoding=Encoding.FULL)


def incoming_for(job: Job, buffers: frozenset[str] = frozenset()) -> UpdateFormat:
    """How the job's sites send their federated updates; ``buffers``: the model's buffer
    names (compression sends them whole)."""
    if job.privacy.secure_aggregation is not None:
        return UpdateFormat(Encoding.MASKED)
    if job.privacy.he is not None:
        return UpdateFormat(Encoding.ENCRYPTED, he=job.privacy.he)
    c = job.compression
    if c is not None:
        return UpdateFormat(Encoding(c.method), c.fraction, frozenset(buffers))
    return UpdateFormat()


def combiner_for(
    job: Job, noise_seed: int | None, exchange=None, train_sizes: Mapping[str, int] | None = None,
    local_keys: frozenset[str] = frozenset(), he_context: ts.Context | None = None,
) -> Combiner:
    """The job's combiner. ``noise_seed``: an int makes DP noise repeatable (simulation);
    None draws it from the OS (deployment). ``exchange``: the transport, for secure
    aggregation's and homomorphic aggregation's extra messages; ``train_sizes`` its
    weights; ``local_keys`` the entries that stay at the sites; ``he_context``: a
    deployment's public CKKS context."""
    dp, sa, r = job.privacy.dp, job.privacy.secure_aggregation, job.robust
    if job.privacy.he is not None:
        from medfed.privacy.he.integration import server_combiner

        return server_combiner(job, noise_seed is None, exchange, local_keys, he_context)
    if sa is not None:
        from medfed.privacy.secagg.integration import SecureSum

        central = dp if dp is not None and dp.noise == "central" else None
        return SecureSum(job, exchange, dict(train_sizes or {}), central, noise_seed, local_keys)
    if dp is not None and dp.noise == "central":
        from medfed.privacy.dp import AdaptiveClipper, CentralDP

        adaptive = None
        if dp.adaptive is not None:
            a = dp.adaptive
            adaptive = AdaptiveClipper(a.target_quantile, a.lr, a.count_noise_multiplier)
        return CentralDP(dp.clip, dp.noise_multiplier, adaptive, noise_seed)
    if r is not None:
        from medfed.robust import rules

        if r.rule == "median":
            return rules.CoordinateMedian()
        if r.rule == "trimmed_mean":
            return rules.TrimmedMean(r.trim)
        if r.rule in ("krum", "multi_krum"):
            return rules.Krum(r.f, r.select or 1)
        return rules.NormBound(r.max_norm)
    return WeightedMean()


def ledger_for(job: Job, train_sizes: Mapping[str, int], released_again: int = 0):
    """The privacy ledger of the job (None without DP): epsilon after each round, and the
    last round the budget allows. ``train_sizes``: training examples per site (DP-SGD's
    sampling rates); ``released_again``: rounds a resumed deployment redid after releasing
    something in them (see :class:`~medfed.privacy.accounting.PrivacyLedger`)."""
    rounds = job.rounds + released_again
    from medfed.privacy.accounting import PrivacyLedger, epsilon_schedule

    dp, sgd = job.privacy.dp, job.privacy.dp_sgd
    if dp is not None:
        n = len(job.training_sites)
        if dp.noise == "central":
            # the server adds noise to a sum a site is in or not (add/remove one site's data,
            # sensitivity C); a site is drawn with chance k/n (amplification by sampling)
            z, q = dp.noise_multiplier, job.sites_per_round / n
        else:
            # each site's noisy update is released as it is and the server sees that it came:
            # neighbouring data sets swap one update for another (sensitivity 2C), no sampling
            z, q = dp.noise_multiplier / 2, 1.0
        schedule = epsilon_schedule(z, q, 1, rounds, dp.delta, dp.accountant)
        what = f"site-level, {dp.noise} noise"
        return _checked(PrivacyLedger(schedule, dp.delta, dp.max_epsilon, what, released_again), "dp")
    if sgd is not None:
        from medfed.privacy.dpsgd import sample_rate, steps_per_round

        worst: list[float] | None = None
        for site in job.training_sites:
            size = train_sizes.get(site)
            if not size:
                continue
            steps = steps_per_round(size, job.train.batch_size, job.train.local_epochs)
            schedule = epsilon_schedule(
                sgd.noise_multiplier, sample_rate(size, job.train.batch_size), steps, rounds, sgd.delta,
                sgd.accountant,
            )
            worst = schedule if worst is None else [max(a, b) for a, b in zip(worst, schedule)]
        if worst is None:
            return None
        return _checked(PrivacyLedger(worst, sgd.delta, sgd.max_epsilon, "sample-level (DP-SGD), worst site",
                                      released_again), "dp_sgd")
    return None


def _checked(ledger, field: str):
    """Refuse a budget that not even the first round fits (a resumed run whose earlier
    releases used it up stops where the loop finds the budget passed, saying so)."""
    if ledger.last_round < 1 and not ledger.released_again:
        raise ConfigError(
            f"privacy.{field}.max_epsilon: {ledger.max_epsilon:g} is passed after round 1 already "
            f"(epsilon {ledger.epsilon(1):.3g} at delta {ledger.delta:g}); raise it or the noise multiplier"
        )
    return ledger
