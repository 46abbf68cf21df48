"""q-FedAvg (Li, Sanjabi, Beirami and Smith, ICLR 2020, "Fair Resource Allocation in
Federated Learning"): the server step of q-FFL, which minimizes ``sum_k F_k^(q+1) / (q+1)``
and so gives more weight to the sites where the global model does worse.

Site k measures ``F_k``, the task loss of the global model it received on its training
split (before it trains: the training step does it for a hook with ``wants_start_loss``),
trains as in FedAvg and sends its model ``w_k`` with ``F_k`` as the extra ``qffl/loss``.
With ``L`` the Lipschitz estimate (``algorithm.lipschitz``, else ``1 / train.lr``) the
server forms ``dw_k = L (w - w_k)``, ``D_k = F_k^q dw_k`` and
``h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q``, and steps to ``w - sum_k D_k / sum_k h_k``.
``||dw_k||^2`` is taken over all trainable parameters together. ``q = 0`` is the
unweighted mean of the sites' models (every site counts once, whatever its size).

The factors ``F_k^q`` are divided by their largest (the ratio is the same) so that a large
``q`` cannot overflow; a loss of 0 counts as 1e-10, as in the authors' code. Buffers
(batch-norm statistics, counters) take the unweighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, SiteHook
from medfed.algorithms.mean import weighted_average
from medfed.core.types import Params, RoundPlan, Update

LOSS_KEY = "qffl/loss"  # the extra holding F_k, one float64 value
MIN_LOSS = 1e-10  # F_k = 0 would make F_k^(q-1) infinite for q < 1


class QFedAvgHook(SiteHook):
    """Plain local training; sends the loss of the starting (global) model with the update."""

    wants_start_loss = True

    def __init__(self) -> None:
        self.loss: float | None = None

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        self.loss = None  # measured again every round

    def on_start_loss(self, loss: float | None) -> None:
        self.loss = loss

    def on_train_end(self, model: nn.Module, num_steps: int) -> Params:
        value = math.nan if self.loss is None else self.loss  # the server leaves such a site out, saying why
        return {LOSS_KEY: torch.tensor([value], dtype=torch.float64)}


def fair_weights(losses: Sequence[float], q: float) -> list[float]:
    """``F_k^q`` for each site, divided by the largest (only their ratios matter)."""
    logs = [q * math.log(max(f, MIN_LOSS)) for f in losses]
    top = max(logs)
    return [math.exp(v - top) for v in logs]


class QFedAvg(Algorithm):
    name = "qfedavg"

    def __init__(self, q: float, lipschitz: float | None, trainable: frozenset[str] = frozenset()):
        """``lipschitz``: L; None only where the rule is never applied (the site's copy)."""
        super().__init__(trainable)
        if q < 0:
            raise ValueError(f"algorithm.q: must be >= 0, got {q}")
        if lipschitz is not None and not lipschitz > 0:
            raise ValueError(f"algorithm.lipschitz: must be > 0, got {lipschitz}")
        self.q = q
        self.lipschitz = lipschitz

    def make_site_hook(self) -> SiteHook:
        return QFedAvgHook()

    def update_problem(self, update: Update, global_params: Params) -> str | None:
        loss = update.extras.get(LOSS_KEY)
        if loss is None:
            return f"qfedavg needs the site's loss before training ('{LOSS_KEY}'), the update has none"
        if loss.numel() != 1 or not loss.is_floating_point():
            return f"'{LOSS_KEY}' must hold one floating-point value, got {loss.dtype} {tuple(loss.shape)}"
        value = float(loss.reshape(-1)[0])
        if not math.isfinite(value) or value < 0:
            return f"'{LOSS_KEY}' must be a finite loss >= 0, got {value!r}"
        return None

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        if self.lipschitz is None:
            raise ValueError("qfedavg's server rule needs L: algorithm.lipschitz or the local learning rate (1 / train.lr)")
        L, q = self.lipschitz, self.q
        losses = [float(u.extras[LOSS_KEY].reshape(-1)[0]) for u in updates]
        scale = fair_weights(losses, q)  # F_k^q, up to one common factor
        out = weighted_average([u.params for u in updates], [1.0] * len(updates))  # buffers: the plain mean
        names = [n for n in sorted(self.trainable) if n in out and out[n].is_floating_point()]
        x = {n: global_params[n].to(torch.float64) for n in names}
        # ||dw_k||^2 over the whole trainable vector, dw_k = L (w - w_k)
        sq = [sum(float(((x[n] - u.params[n].to(torch.float64)) ** 2).sum()) for n in names) * L * L for u in updates]
        # h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q, with F_k^(q-1) = F_k^q / F_k
        h = sum(s * (q * d / max(f, MIN_LOSS) + L) for s, d, f in zip(scale, sq, losses))
        for n in names:
            step = sum(s * L * (x[n] - u.params[n].to(torch.float64)) for s, u in zip(scale, updates))
            out[n] = (x[n] - step / h).to(global_params[n].dtype)
        return out
