"""Arithmetic on state dicts (:data:`~medfed.core.types.Params`) shared by the update path:
deltas to the global model, their L2 norm and clipping.

A *delta* holds the floating-point entries only: integer buffers (batch-norm
``num_batches_tracked``) are counters, not parameters, and travel as full values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from medfed.core.tensors import describe
from medfed.core.types import Params


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf: one sum, which is finite only if every value is
    (Inf and NaN propagate through a sum); only when the sum itself overflows are the
    values tested one by one. Many times faster than ``isfinite(t).all()`` on large
    tensors, which the server runs on every update."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def float_names(params: Params, names: Iterable[str] | None = None) -> list[str]:
    """The names of ``params`` (or of ``names``, in their order) that hold floating-point
    tensors."""
    keys = params.keys() if names is None else names
    return [k for k in keys if describe(params, k)[1].is_floating_point]  # (a file's tensors are not read)


def delta(params: Params, reference: Params) -> Params:
    """``params - reference`` over the floating-point entries of ``params``, in float32
    (float64 entries stay float64), listed by name: what the server then sums or draws
    entry by entry (a norm, DP noise) does not depend on the order in which an update or
    the global model listed its tensors (a model lists them by layer, a file by name)."""
    out: Params = {}
    for k in sorted(float_names(params)):
        t = params[k]
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        out[k] = t.to(dt) - reference[k].to(dt)
    return out


def apply_delta(reference: Params, d: Params, full: Params | None = None) -> Params:
    """``reference + d`` cast to ``reference``'s dtypes, for the names of ``d``; plus the
    entries of ``full`` (values that travel whole, e.g. integer buffers) as they are."""
    out: Params = {k: (reference[k].to(v.dtype) + v).to(reference[k].dtype) for k, v in d.items()}
    if full:
        out.update(full)
    return out


def l2_norm(d: Params) -> float:
    """The global L2 norm of all entries of ``d`` taken as one vector (float64 sum)."""
    sq = 0.0
    for t in d.values():
        sq += float(t.to(torch.float64).square().sum())
    return math.sqrt(sq)


def clip_to_norm(d: Params, bound: float) -> tuple[Params, float]:
    """``d`` scaled so that its global L2 norm is at most ``bound`` (unchanged when it
    already is), and the norm before clipping. ``bound`` must be > 0."""
    if not bound > 0:
        raise ValueError(f"clipping bound must be > 0, got {bound}")
    norm = l2_norm(d)
    if norm <= bound:
        return dict(d), norm
    # the product is rounded to each tensor's dtype, which can push the norm a hair over the
    # bound: shrink by a margin far above float32's relative error, and check
    scale = bound / norm * (1 - 1e-6)
    out = {k: t * scale for k, t in d.items()}
    while l2_norm(out) > bound:
        scale *= 1 - 1e-6
        out = {k: t * scale for k, t in d.items()}
    return out, norm


def nbytes(params: Params) -> int:
    """Bytes of tensor data in ``params`` (what a payload carries, less its header), from
    shapes and dtypes: tensors kept on disk (core/payload.FileTensors) are not read."""
    total = 0
    for name in params:
        shape, dtype = describe(params, name)
        total += math.prod(shape) * dtype.itemsize
    return total


@torch.no_grad()
def moving_average(average: Params, current: Params, decay: float) -> None:
    """Update ``average`` in place toward ``current`` (a model's state dict):
    ``average = decay * average + (1 - decay) * current`` for floating-point entries; other
    entries (counters such as batch norm's ``num_batches_tracked``) are copied. A mean
    teacher's and BYOL's target network."""
    for name, value in current.items():
        t = average[name]
        if t.is_floating_point():
            t.mul_(decay).add_(value.detach().to(t.dtype), alpha=1 - decay)
        else:
            t.copy_(value)


def average_start(average: Params | None, current: Params, device: torch.device) -> Params:
    """A moving average at the start of a round: a copy of ``current`` (a model's state
    dict) the first time, else ``average`` (taken up from a state file on the CPU, or kept
    from the last round) on ``device``."""
    if average is None:
        return {k: v.detach().clone() for k, v in current.items()}
    return {k: v.to(device) for k, v in average.items()}
