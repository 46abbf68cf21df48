"""FedAvg (McMahan et al., 2017): the example-weighted mean of the sites' parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medfed.algorithms.base import Algorithm
from medfed.core.codec import PIECE, describe, piece
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
    for name in params_list[0]:
        shape, dtype = describe(params_list[0], name)
        count = math.prod(shape)
        result = torch.empty(count, dtype=dtype)
        # part by part (updates spooled to disk are read a part at a time): memory stays
        # at a few parts whatever the number of sites; same arithmetic as a whole tensor
        acc = torch.empty(min(PIECE, count), dtype=torch.float64)
        tmp, buf = torch.empty_like(acc), torch.empty(min(PIECE, count), dtype=dtype)
        for start in range(0, count, PIECE):
            stop = min(start + PIECE, count)
            a, t = acc[: stop - start], tmp[: stop - start]
            a.zero_()
            for params, w in zip(params_list, weights):
                t.copy_(piece(params, name, start, stop, buf[: stop - start]))
                t.mul_(float(w) / total)
                a.add_(t)
            result[start:stop] = a if dtype.is_floating_point else a.round()
        out[name] = result.reshape(shape)
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
