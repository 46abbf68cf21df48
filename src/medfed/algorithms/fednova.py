"""FedNova (Wang et al., NeurIPS 2020): normalized averaging for unequal local work.

Site i starts from ``x``, takes ``tau_i`` optimizer steps and ends at ``y_i``. Its
normalized direction is ``d_i = (x - y_i) / a_i``, where ``a_i`` is the number of steps
weighted by the optimizer: ``tau_i`` for plain SGD, and with heavy-ball momentum ``rho``
``a_i = (tau_i - rho * (1 - rho**tau_i) / (1 - rho)) / (1 - rho)``. With example shares
``p_i``, the server moves ``x`` by ``-tau_eff * sum_i p_i d_i`` where
``tau_eff = sum_i p_i a_i`` — FedAvg's step length, without the bias towards sites that
took more steps. With the same ``tau_i`` everywhere this is exactly FedAvg.

Only trainable parameters are normalized; buffers (batch-norm statistics) take the plain
weighted mean. Weight decay is not part of ``a_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medfed.algorithms.base import Algorithm
from medfed.algorithms.mean import weighted_average
from medfed.core.types import Params, Update


def step_weight(tau: int, momentum: float) -> float:
    """``a_i``: how far ``tau`` steps of (momentum) SGD reach, in units of one step."""
    if momentum == 0:
        return float(tau)
    rho = momentum
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)


class FedNova(Algorithm):
    name = "fednova"

    def __init__(self, momentum: float, trainable: frozenset[str] = frozenset()):
        super().__init__(trainable)
        self.momentum = momentum

    def update_problem(self, update: Update, global_params: Params) -> str | None:
        return None if update.num_steps > 0 else f"num_steps must be > 0 for fednova, got {update.num_steps}"

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        out = weighted_average([u.params for u in updates], [u.num_examples for u in updates])
        total = float(sum(u.num_examples for u in updates))
        shares = [u.num_examples / total for u in updates]
        a = [step_weight(u.num_steps, self.momentum) for u in updates]
        tau_eff = sum(p * ai for p, ai in zip(shares, a))
        for name in self.trainable:
            if name not in out or not out[name].is_floating_point():
                continue
            x = global_params[name].to(torch.float64)
            d = sum((p / ai) * (x - u.params[name].to(torch.float64)) for p, ai, u in zip(shares, a, updates))
            out[name] = (x - tau_eff * d).to(global_params[name].dtype)
        return out
