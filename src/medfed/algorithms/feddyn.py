"""FedDyn (Acar et al., ICLR 2021): dynamic regularization.

Site i keeps ``g_i`` (zero at first). In a round from the global ``x`` its local loss is
``task_loss(w) - <g_i, w> + alpha/2 * ||w - x||^2``; after training to ``y_i`` it sets
``g_i = g_i - alpha * (y_i - x)``. The server keeps ``h`` (zero at first):
``h = h - alpha * (1/N) * sum_{i in S} (y_i - x)`` over the S answering sites of N, and
``x = mean_{i in S}(y_i) - h / alpha`` (plain mean, as in the paper). Trainable parameters
only; buffers take the example-weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, SiteHook
from medfed.algorithms.mean import weighted_average
from medfed.core.types import Params, RoundPlan, Update


class DynamicRegularizerHook(SiteHook):
    state_fields = ("g",)  # the site's linear term

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.g: dict[str, torch.Tensor] | None = None
        self.x: dict[str, torch.Tensor] = {}

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        self.x = {n: p.detach().clone() for n, p in model.named_parameters()}
        mine = self.g or {}  # zero before the site's first round
        self.g = {n: mine[n].to(p.device) if n in mine else torch.zeros_like(p.detach())
                  for n, p in model.named_parameters()}

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        linear = sum((self.g[n] * p).sum() for n, p in model.named_parameters())
        prox = sum(((p - self.x[n]) ** 2).sum() for n, p in model.named_parameters())
        return -linear + 0.5 * self.alpha * prox

    def on_train_end(self, model: nn.Module, num_steps: int) -> Params:
        for n, p in model.named_parameters():
            self.g[n] = self.g[n] - self.alpha * (p.detach() - self.x[n])
        return {}


class FedDyn(Algorithm):
    state_fields = ("h",)

    name = "feddyn"

    def __init__(self, alpha: float, num_sites: int, trainable: frozenset[str] = frozenset()):
        super().__init__(trainable)
        self.alpha = alpha
        self.num_sites = num_sites
        self.h: Params = {}

    def make_site_hook(self) -> SiteHook:
        return DynamicRegularizerHook(self.alpha)

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        out = weighted_average([u.params for u in updates], [u.num_examples for u in updates])
        for name in self.trainable:
            if name not in out or not out[name].is_floating_point():
                continue
            x = global_params[name].to(torch.float64)
            ys = [u.params[name].to(torch.float64) for u in updates]
            h = self.h.get(name, torch.zeros_like(x))
            h = h - self.alpha * sum(y - x for y in ys) / self.num_sites
            self.h[name] = h
            out[name] = (sum(ys) / len(ys) - h / self.alpha).to(global_params[name].dtype)
        return out
