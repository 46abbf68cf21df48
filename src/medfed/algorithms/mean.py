"""The example-weighted mean of parameter sets: FedAvg's rule, and the step every mean-based
combiner and rule ends with. Pure arithmetic over tensors, in memory or on disk
(core/tensors.py), in float64."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medfed.core.tensors import SLICE, describe, flat_slice
from medfed.core.types import Params


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
    coefficients = [float(w) / total for w in weights]
    out: Params = {}
    for name in params_list[0]:
        shape, dtype = describe(params_list[0], name)
        out[name] = combination(params_list, coefficients, name, shape, dtype)
    return out


def combination(sources: Sequence[Params], coefficients: Sequence[float], name: str,
                shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``Σ_i coefficients[i] * sources[i][name]`` accumulated in float64 and cast back to
    ``dtype`` (integer entries rounded). Part by part (updates spooled to disk are read a
    part at a time): memory stays at a few parts whatever the number of sites; the same
    arithmetic as a whole tensor."""
    count = math.prod(shape)
    result = torch.empty(count, dtype=dtype)
    acc = torch.empty(min(SLICE, count), dtype=torch.float64)
    tmp, buf = torch.empty_like(acc), torch.empty(min(SLICE, count), dtype=dtype)
    for start in range(0, count, SLICE):
        stop = min(start + SLICE, count)
        a, t = acc[: stop - start], tmp[: stop - start]
        a.zero_()
        for params, w in zip(sources, coefficients):
            t.copy_(flat_slice(params, name, start, stop, buf[: stop - start]))
            t.mul_(w)
            a.add_(t)
        result[start:stop] = a if dtype.is_floating_point else a.round()
    return result.reshape(shape)
