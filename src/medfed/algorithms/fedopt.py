"""Server optimizers on the pseudo-gradient: FedAvgM, FedAdagrad, FedAdam, FedYogi.

With ``x`` the global parameters and ``delta`` the example-weighted mean of the site
parameters minus ``x`` (the pseudo-gradient, a descent direction):

* FedAvgM (Hsu et al., 2019): ``v = beta1 * v + delta``; ``x += server_lr * v``.
* FedAdagrad, FedAdam, FedYogi (Reddi et al., 2021): ``m = beta1 * m + (1 - beta1) * delta``;
  ``v`` accumulates ``delta**2`` (Adagrad: ``v + d2``; Adam: ``beta2 * v + (1 - beta2) * d2``;
  Yogi: ``v - (1 - beta2) * d2 * sign(v - d2)``), starting at ``tau**2``;
  ``x += server_lr * m / (sqrt(v) + tau)``.

Only trainable parameters take these steps; buffers (batch-norm statistics, counters)
take the plain weighted mean, as in FedAvg. Server state lives for the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medfed.algorithms.base import Algorithm, Combiner
from medfed.core.types import Params, Update


class FedOpt(Algorithm):
    state_fields = ("m", "v")

    def __init__(
        self, name: str, server_lr: float, beta1: float, beta2: float, tau: float,
        trainable: frozenset[str] = frozenset(), combiner: Combiner | None = None,
    ):
        super().__init__(trainable, combiner)
        if name not in ("fedavgm", "fedadagrad", "fedadam", "fedyogi"):
            raise ValueError(f"unknown server optimizer '{name}'")
        self.name = name
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: Params = {}
        self.v: Params = {}

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        mean = self.combiner.combine(global_params, updates, updates[0].round)
        out: Params = {}
        for name, avg in mean.items():
            if name not in self.trainable or not avg.is_floating_point():
                out[name] = avg
                continue
            x = global_params[name].to(torch.float64)
            out[name] = (x + self.server_lr * self._step(name, avg.to(torch.float64) - x)).to(avg.dtype)
        # entries the combiner did not produce (kept at the sites, or not summed under
        # secure aggregation) keep the server's value
        return {k: out.get(k, v) for k, v in global_params.items()}

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The update direction for one tensor, advancing the optimizer state."""
        if self.name == "fedavgm":
            v = self.v.get(name, torch.zeros_like(delta))
            self.v[name] = v = self.beta1 * v + delta
            return v
        m = self.m.get(name, torch.zeros_like(delta))
        self.m[name] = m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.v.get(name, torch.full_like(delta, self.tau**2))
        d2 = delta * delta
        if self.name == "fedadagrad":
            v = v + d2
        elif self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * d2
        else:  # fedyogi
            v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
        self.v[name] = v
        return m / (torch.sqrt(v) + self.tau)
