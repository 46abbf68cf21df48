"""MOON (Li, He and Song, CVPR 2021): model-contrastive federated learning.

At each local step the site adds ``mu * l_con``, a contrastive term that pulls the
representation ``z`` of the model being trained towards that of the global model
(``z_glob``) and away from that of its own model of the previous round (``z_prev``):
``l_con = -log(exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)))``
with cosine similarity ``sim``. The representation is the input of the model's last
linear layer (the classifier head), captured with forward hooks, so it works for every
network medfed builds; the paper adds a projection head, which medfed does not. In a
site's first round there is no previous model and the term is zero. The server averages
as FedAvg.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medfed.algorithms.base import Combiner, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.core.types import Params, RoundPlan


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` module (its classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model '{type(model).__name__}' has no linear layer to take a representation from")
    return linears[-1]


def representation(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D): the input of ``model``'s last linear layer for the batch ``x``."""
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1)


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over the batch of MOON's ``l_con`` (see the module docstring)."""
    pos = F.cosine_similarity(z, z_glob, dim=1) / tau
    neg = F.cosine_similarity(z, z_prev, dim=1) / tau
    logits = torch.stack([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


class MoonHook(SiteHook):
    def __init__(self, mu: float, tau: float):
        self.mu, self.tau = mu, tau
        self.previous: nn.Module | None = None  # this site's model at the end of its last round
        self._restored: Params | None = None  # ``previous`` from a saved site state, made a model at the next start
        self.glob: nn.Module | None = None
        self._x: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._handles: list = []

    def state(self) -> Params:
        if self._restored is not None:
            return {f"previous/{k}": v.clone() for k, v in self._restored.items()}
        if self.previous is None:
            return {}
        return {f"previous/{k}": v.detach().to("cpu", copy=True) for k, v in self.previous.state_dict().items()}

    def load_state(self, state: Params) -> None:
        wrong = [k for k in state if not k.startswith("previous/")]
        if wrong:
            raise ValueError(f"MoonHook: unexpected site state entry '{wrong[0]}'")
        self.previous = None
        self._restored = {k.removeprefix("previous/"): v.clone() for k, v in state.items()} or None

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        if self._restored is not None:  # the saved previous model, in a copy of this site's network
            self.previous = copy.deepcopy(model).eval()
            self.previous.load_state_dict(self._restored)
            self._restored = None
        self.glob = copy.deepcopy(model).eval() if self.previous is not None else None
        self._handles = [
            model.register_forward_pre_hook(lambda _m, args: setattr(self, "_x", args[0])),
            last_linear(model).register_forward_pre_hook(lambda _m, args: setattr(self, "_z", args[0])),
        ]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.previous is None or self.glob is None or self._x is None or self._z is None:
            return None
        with torch.no_grad():
            z_glob = representation(self.glob, self._x)
            z_prev = representation(self.previous, self._x)
        return self.mu * contrastive_loss(self._z.flatten(1), z_glob, z_prev, self.tau)

    def on_train_end(self, model: nn.Module, num_steps: int) -> dict:
        for h in self._handles:
            h.remove()
        self._handles, self._x, self._z, self.glob = [], None, None, None
        self.previous = copy.deepcopy(model).eval()
        return {}


class Moon(FedAvg):
    name = "moon"

    def __init__(self, mu: float, tau: float, trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.mu, self.tau = mu, tau

    def make_site_hook(self) -> SiteHook:
        return MoonHook(self.mu, self.tau)
