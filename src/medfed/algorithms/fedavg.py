"""FedAvg (McMahan et al., 2017): the example-weighted mean of the sites' parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medfed.algorithms.base import Algorithm
from medfed.core.types import Params, Update


def weighted_average(params_list: Sequence[Params], weights: Sequence[float]) -> Params:
    """Weighted mean of state dicts with the same names and shapes.

    Accumulates in float64 and casts back to each tensor's dtype; integer tensors (e.g.
    batch-norm ``num_batches_tracked``) are rounded. Weights need not sum to 1.
    """
    if not params_list:
        raise ValueError("weighted_average needs at least one set of parameters")
    if len(params_list) != len(weights):
        raise ValueError(f"{len(params_list)} parameter sets but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: Params = {}
    for name, first in params_list[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for params, w in zip(params_list, weights):
            acc += params[name].to(torch.float64) * (float(w) / total)
        out[name] = acc.round().to(first.dtype) if not first.is_floating_point() else acc.to(first.dtype)
    return out


class FedAvg(Algorithm):
    name = "fedavg"
    uses_combiner = True

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        """The weighted mean of what the sites sent (or what the job's combiner makes of
        it); entries they keep local (``local_keys``) keep the server's value, so the global
        state dict always has every name."""
        shared = self.combiner.combine(global_params, updates, updates[0].round)
        return {k: shared.get(k, v) for k, v in global_params.items()}
