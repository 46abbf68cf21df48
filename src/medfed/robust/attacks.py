"""Attack simulation for robustness studies: which sites misbehave, label flipping at
their data, and poisoned updates as an outgoing filter. Simulation only: nothing here
runs in a real deployment unless a job asks for it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch

from medfed.core.params import apply_delta, delta
from medfed.core.types import Encoding, Params, RoundPlan, Update
from medfed.privacy.base import UpdateFilter

# second word of the attacker draw's seed: keeps it apart from other draws of the same seed
_ATTACKER_STREAM = 0xA77AC

LABEL_KINDS = ("binary", "multiclass", "multilabel")
POISON_KINDS = ("sign_flip", "scale", "noise")


def choose_attackers(training_sites: list[str], fraction: float, seed: int) -> list[str]:
    """The k = floor(fraction * n + 0.5) attacking sites among the n ``training_sites``,
    drawn by a seeded permutation and returned in the job's site order.

    ``fraction`` in [0, 1); ``seed`` a non-negative integer (the same seed gives the same
    attackers).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    n = len(training_sites)
    k = math.floor(fraction * n + 0.5)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _ATTACKER_STREAM]))
    picked = set(rng.permutation(n)[:k].tolist())
    return [s for i, s in enumerate(training_sites) if i in picked]


def flip_labels(labels: torch.Tensor, labels_kind: str, num_classes: int) -> torch.Tensor:
    """Labels as a label-flipping attacker would train on them; same dtype and shape.

    ``labels`` as :class:`~medfed.data.base.ArraySplit` holds them: int64 (N,) class
    indices for ``binary`` (y -> 1 - y) and ``multiclass`` (y -> num_classes - 1 - y);
    float32 (N, K) of 0/1 for ``multilabel`` (every label flipped).
    """
    if labels_kind not in LABEL_KINDS:
        raise ValueError(f"labels_kind must be one of {LABEL_KINDS}, got {labels_kind!r}")
    if labels.numel() == 0:
        return labels.clone()
    if labels_kind == "multiclass":
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"multiclass labels must lie in [0, {num_classes}), got values in "
                f"[{labels.min().item()}, {labels.max().item()}]"
            )
        return (num_classes - 1 - labels).to(labels.dtype)
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{labels_kind} labels must be 0 or 1")
    if labels.dtype == torch.bool:
        return ~labels
    return (1 - labels).to(labels.dtype)


class PoisonFilter(UpdateFilter):
    """A malicious site's outgoing filter: it rewrites the update's delta to the global
    model. Put it first on the path, where updates still hold full values.

    ``kind``:
      * ``sign_flip``: delta -> -scale * delta
      * ``scale`` (model replacement, Bagdasaryan et al., 2020): delta -> scale * delta
      * ``noise``: delta -> Gaussian noise of std ``scale`` (parameter units) per
        coordinate, from a generator seeded with the round's ``plan.train.seed``.
    ``scale``: a finite number > 0. Integer buffers travel unchanged.
    """

    def __init__(self, kind: str, scale: float):
        if kind not in POISON_KINDS:
            raise ValueError(f"kind must be one of {POISON_KINDS}, got {kind!r}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.kind = kind
        self.scale = float(scale)

    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        if update.encoding is not Encoding.FULL:
            raise ValueError(
                f"site '{update.site}': the poison filter needs full values, got encoding "
                f"'{update.encoding.value}'; put it before compression and secure aggregation"
            )
        d = delta(update.params, global_params)
        poisoned = self._poison(d, plan.train.seed)
        full = {k: v for k, v in update.params.items() if not v.is_floating_point()}
        params = apply_delta(global_params, poisoned, full=full)
        return dataclasses.replace(update, params={k: params[k] for k in update.params})

    def _poison(self, d: Params, seed: int) -> Params:
        if self.kind == "sign_flip":
            return {k: -self.scale * t for k, t in d.items()}
        if self.kind == "scale":
            return {k: self.scale * t for k, t in d.items()}
        gen = torch.Generator().manual_seed(seed)
        # names in the update's order, so the same seed gives the same noise per tensor
        return {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) * self.scale for k, t in d.items()}
