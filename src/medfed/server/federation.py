"""The federation a run trains, built once from the job for a simulation and a deployment
alike: the algorithm (server rule, site hooks) with its combiner, how the sites' updates
arrive, which sites train each round, and the privacy ledger.

``run_federated`` (server/loop.py) takes a :class:`Federation`; the topologies to come
(cyclic, swarm, split) are further functions of the same shape over the same object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from medfed.algorithms import Algorithm, build_algorithm, local_keys
from medfed.algorithms.base import buffer_keys, trainable_keys
from medfed.algorithms.sampled_mean import SampledMean
from medfed.config import Job
from medfed.core.errors import ConfigError
from medfed.server.sampling import SiteSampler
from medfed.server.update_path import UpdateFormat, combiner_for, incoming_for, ledger_for
from medfed.transport.base import Transport

if TYPE_CHECKING:  # Opacus is imported only by jobs with differential privacy, TenSEAL by those with HE
    import tenseal as ts

    from medfed.privacy.accounting import PrivacyLedger


@dataclass
class Federation:
    """What ``run_federated`` trains with.

    ``algorithm``: the server rule with its combiner (the weighted mean, a robust rule,
    central DP or the secure sum); ``incoming``: how the sites encode their federated
    updates; ``sampler``: the sites of each round; ``ledger``: epsilon after each round and
    the last round the privacy budget allows (None without DP); ``frozen``: the job's
    frozen parameters (``model.freeze``), which keep their starting values whatever DP
    noise, secure aggregation's rounding or the server rule would make of them;
    ``kept_rounds``: the last federated round whose update the run kept, per site (filled
    as rounds go; a resumed run starts from its saved rounds), against which a site's
    ``state_round`` is checked (site/state.py)."""

    job: Job
    algorithm: Algorithm
    incoming: UpdateFormat
    sampler: SiteSampler
    ledger: PrivacyLedger | None = None
    frozen: frozenset[str] = frozenset()
    kept_rounds: dict[str, int] = field(default_factory=dict)


def build_federation(
    job: Job, model: nn.Module, exchange: Transport, train_sizes: Mapping[str, int], noise_seed: int | None,
    he_context: ts.Context | None = None,
) -> Federation:
    """The federation of ``job`` for ``model`` (its names: trainable, buffers, layers kept
    at the sites). ``exchange``: the transport, which carries secure aggregation's extra
    messages; ``train_sizes``: training examples per site that has reported them (the
    weights, sampling by size, DP-SGD's rates); ``noise_seed``: an int makes central DP
    noise repeatable (a simulation), None draws it from the OS (a deployment);
    ``he_context``: a deployment's public CKKS context (``privacy.he``)."""
    kept = local_keys(job.algorithm, model)
    combiner = combiner_for(job, noise_seed, exchange, train_sizes, kept, he_context)
    if job.sampling.method == "unbiased":  # the sampler's coefficients replace the example weights
        combiner = SampledMean(trainable_keys(model))
    algorithm = build_algorithm(job.algorithm, model, len(job.training_sites), job.train.momentum, combiner,
                                lr=job.train.lr)
    sizes = dict(train_sizes) if all(train_sizes.get(s, 0) > 0 for s in job.training_sites) else None
    try:
        sampler = SiteSampler(job, sizes)
    except ValueError as e:
        missing = [s for s in job.training_sites if not train_sizes.get(s)]
        raise ConfigError(f"sampling.method: {e}; every training site must have joined (missing: "
                          f"{', '.join(missing) or 'none'})") from None
    frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)  # set by model.freeze
    return Federation(job, algorithm, incoming_for(job, buffer_keys(model)), sampler, ledger_for(job, train_sizes),
                      frozen)
