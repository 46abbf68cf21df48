"""The combiner of ``sampling: {method: unbiased}`` (server/unbiased.py): the mean of the
round's updates with per-site coefficients the sampler gives, in place of the example
weights.

With ``θ`` the global parameters and ``θ_k`` site k's, each trainable floating-point entry
becomes ``θ + Σ_k step[k] (θ_k - θ)`` (the sampler's step-normalized mean: its coefficients
need not sum to 1), every other entry (batch-norm statistics, counters) ``Σ_k mean[k] θ_k``
(a plain mean: its coefficients sum to 1), as FedNova treats buffers. Pure arithmetic in
float64, a part at a time like :func:`~medfed.algorithms.mean.weighted_average`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


from medfed.algorithms.base import Combiner, SiteCoefficients
from medfed.algorithms.mean import combination
from medfed.core.tensors import describe
from medfed.core.types import Params, Update


class SampledMean(Combiner):
    """The updates combined with the sampler's :class:`SiteCoefficients` of the round
    (given by :meth:`weigh` before each :meth:`combine`). ``trainable`` names the entries
    that take the step-normalized mean."""

    name = "sampled_mean"

    def __init__(self, trainable: frozenset[str]):
        self.trainable = trainable
        self.coefficients: SiteCoefficients | None = None

    def weigh(self, coefficients: SiteCoefficients) -> None:
        self.coefficients = coefficients

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        c, self.coefficients = self.coefficients, None  # each round's coefficients serve once
        if c is None or c.round != rnd:
            raise RuntimeError(f"round {rnd}: sampling.method unbiased combines with the sampler's coefficients of "
                               f"the round, but it has {'none' if c is None else f'those of round {c.round}'}")
        sites = [u.site for u in updates]
        if set(sites) != set(c.step) or set(sites) != set(c.mean):
            raise RuntimeError(f"round {rnd}: the sampler's coefficients are for {sorted(c.step)}, the updates "
                               f"from {sorted(sites)}")
        step = [float(c.step[s]) for s in sites]
        mean = [float(c.mean[s]) for s in sites]
        out: Params = {}
        for name in updates[0].params:
            shape, dtype = describe(updates[0].params, name)
            sources = [u.params for u in updates]
            if name in self.trainable and dtype.is_floating_point:  # θ + Σ s_k (θ_k - θ) = Σ s_k θ_k + (1 - Σ s_k) θ
                out[name] = combination([*sources, global_params], [*step, 1.0 - math.fsum(step)], name, shape, dtype)
            else:
                out[name] = combination(sources, mean, name, shape, dtype)
        return out

