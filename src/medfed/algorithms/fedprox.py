"""FedProx (Li et al., 2020): each site adds ``mu/2 * ||w - w_global||^2`` to its loss,
pulling its model towards the global one; the server averages like FedAvg."""

from __future__ import annotations

import torch
from torch import nn

from medfed.algorithms.base import Combiner, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.core.types import Params, RoundPlan


class ProximalHook(SiteHook):
    """``mu/2 ||w - anchor||^2``; the anchor is ``anchor`` (a state dict, e.g. the global
    model Ditto pulls its personal model towards) or, when None, the model as it is at
    ``on_train_start`` (FedProx: the global model)."""

    def __init__(self, mu: float, anchor: Params | None = None):
        self.mu = mu
        self.source = anchor
        self.anchor: list[torch.Tensor] = []  # one tensor per model.parameters() entry, in order

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        if self.source is None:
            self.anchor = [p.detach().clone() for p in model.parameters()]
        else:
            self.anchor = [self.source[n].to(p.device) for n, p in model.named_parameters()]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        sq = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
        return 0.5 * self.mu * sq


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, mu: float, trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.mu = mu

    def make_site_hook(self) -> SiteHook:
        return ProximalHook(self.mu)
