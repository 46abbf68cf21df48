"""SCAFFOLD (Karimireddy et al., 2020) with control variates of option II.

Site i keeps a control variate ``c_i`` (zero at first) and receives the server's ``c``
with the round plan. Every local step's gradient is corrected by ``c - c_i``. After K
steps of learning rate ``lr`` from the global ``x`` to ``y_i``:
``c_i+ = c_i - c + (x - y_i) / (K * lr)``; the site sends ``y_i`` and ``c_i+ - c_i``.
The server sets ``x += server_lr * (weighted mean of y_i - x)`` and
``c += (|S| / N) * mean(c_i+ - c_i)`` over the S answering sites of N in the job.
Control variates cover trainable parameters only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, SiteHook
from medfed.algorithms.mean import weighted_average
from medfed.core.types import Params, RoundPlan, Update

C_PREFIX = "c/"  # server control variate, sent to sites
DC_PREFIX = "dc/"  # change of a site's control variate, sent back


class ScaffoldHook(SiteHook):
    state_fields = ("c_i",)  # the site's control variate

    def __init__(self) -> None:
        self.c_i: dict[str, torch.Tensor] | None = None
        self.c: dict[str, torch.Tensor] = {}
        self.x: dict[str, torch.Tensor] = {}
        self.lr = 0.0

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        named = dict(model.named_parameters())
        self.x = {n: p.detach().clone() for n, p in named.items()}
        self.c = {n: plan.extras.get(C_PREFIX + n, torch.zeros_like(p)).to(p.device, p.dtype) for n, p in named.items()}
        mine = self.c_i or {}  # zero before the site's first round
        self.c_i = {n: mine[n].to(p.device) if n in mine else torch.zeros_like(p.detach()) for n, p in named.items()}
        self.lr = plan.train.lr

    def on_after_backward(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(self.c[n] - self.c_i[n])

    def on_train_end(self, model: nn.Module, num_steps: int) -> Params:
        if num_steps == 0:
            return {DC_PREFIX + n: torch.zeros_like(c).cpu() for n, c in self.c_i.items()}
        extras: Params = {}
        for n, p in model.named_parameters():
            new = self.c_i[n] - self.c[n] + (self.x[n] - p.detach()) / (num_steps * self.lr)
            extras[DC_PREFIX + n] = (new - self.c_i[n]).cpu()
            self.c_i[n] = new
        return extras


class Scaffold(Algorithm):
    state_fields = ("c",)

    name = "scaffold"

    def __init__(self, server_lr: float, num_sites: int, trainable: frozenset[str] = frozenset()):
        super().__init__(trainable)
        self.server_lr = server_lr
        self.num_sites = num_sites
        self.c: Params = {}

    def make_site_hook(self) -> SiteHook:
        return ScaffoldHook()

    def round_extras(self, global_params: Params) -> Params:
        if not self.c:
            self.c = {n: torch.zeros_like(global_params[n]) for n in sorted(self.trainable)}
        return {C_PREFIX + n: c for n, c in self.c.items()}

    def update_problem(self, update: Update, global_params: Params) -> str | None:
        for n in self.trainable:
            dc = update.extras.get(DC_PREFIX + n)
            if dc is None:
                return f"missing control variate change for '{n}'"
            if dc.shape != global_params[n].shape or not bool(torch.isfinite(dc).all()):
                return f"control variate change for '{n}' has the wrong shape or is not finite"
        return None

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        mean = weighted_average([u.params for u in updates], [u.num_examples for u in updates])
        out: Params = {}
        for n, avg in mean.items():
            if n in self.trainable and avg.is_floating_point():
                x = global_params[n].to(torch.float64)
                out[n] = (x + self.server_lr * (avg.to(torch.float64) - x)).to(avg.dtype)
            else:
                out[n] = avg
        share = len(updates) / self.num_sites
        for n in self.c:
            dc = torch.stack([u.extras[DC_PREFIX + n].to(torch.float64) for u in updates]).mean(0)
            self.c[n] = (self.c[n].to(torch.float64) + share * dc).to(self.c[n].dtype)
        return out
