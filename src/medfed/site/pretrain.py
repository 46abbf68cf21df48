"""Self-supervised pretraining at a site: the network wrapped for it, SimCLR and BYOL as site
hooks of the one training step, and the site's answers during the stage.

The job's ``pretrain`` section (config/pretrain.py) runs a federated stage before the
supervised one (server/pretrain.py). Its model is :class:`SSLNet`: the job's network (its
head, the last top-level layer with weights, frozen and never run) with a projection MLP on
the encoder's output (the input of the head, averaged over its spatial axes when it has
any) and, for BYOL, a predictor MLP. Both MLPs are Linear, ReLU, Linear (no batch norm, so a
batch of two images still trains). The stage's sites (:class:`PretrainSite`) train it with
``site/train.train_local``: every example counts as unlabeled, so the task loss takes none,
and the hook's term of the batch (``SiteHook.batch_loss``) is the whole objective.

The two views of each image are made where the step augments its batches (on the CPU, in
the loader's workers for a streamed split), by :class:`TwoViews`: the ``pretrain.views``
steps (MONAI, data/transforms.py) drawn twice from the batch's planned seed, so a run is
repeatable, and put side by side on the channel axis, (B, 2C, *spatial). The SSLNet's
forward pass takes such a pair and gives the projections of both views, (2B, P), view a's
first, in one pass (so batch norm sees both): the step's own ``outputs``, which the hooks
use, so no forward pass is wasted.

* SimCLR (Chen et al., 2020): NT-Xent at temperature t over the 2B projections: for each,
  the cross-entropy of picking its partner (the other view of its image) among the other
  2B - 1 by cosine similarity / t (:func:`nt_xent`).
* BYOL (Grill et al., 2020): the online network (encoder, projector, predictor) predicts, for
  view a, the target's projection of view b and vice versa; loss ``2 - 2 cos(p, z')`` summed
  over the two directions, the target's side without gradient (:func:`byol_loss`). The
  target is the exponential moving average of the online network, ``target = ema * target +
  (1 - ema) * online`` after every optimizer step (its predictor entries are averaged too,
  and unused); it starts as the model the site first trains from and is site state
  (``state_fields``), like the mean teacher's. It runs in training mode (batch statistics),
  as in the paper, on a copy of its running statistics, so those stay the average too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from medfed.algorithms.base import SiteHook
from medfed.data.transforms import build_augment
from medfed.config import Job, PretrainConfig
from medfed.core.errors import ConfigError, SiteError
from medfed.core.params import average_start, moving_average
from medfed.core.types import Arm, EvalResult, Metric, Params, RoundPlan, Split, Update
from medfed.data.base import SiteData
from medfed.data.labels import with_labeled
from medfed.models import get_params
from medfed.site.train import train_local
from medfed.tasks import build_task

NET = "net."  # the job's network's entries inside SSLNet's state dict


class _Reached(Exception):
    """Raised by the tap on the head's input: the rest of the network's forward is not needed."""


def encoder_head(model: nn.Module) -> str:
    """The name of ``model``'s head: its last top-level layer with weights (layers without
    any after it, such as a final activation, are left to it). ConfigError naming
    ``pretrain`` when the network has no such layer, or when the head holds every weight."""
    children = list(model.named_children())
    heads = [name for name, m in children if any(True for _ in m.parameters())]
    if not heads:
        raise ConfigError(f"pretrain: the network {type(model).__name__} has no top-level layer with weights, so "
                          "medfed cannot tell its encoder from its head; use a network made of named layers (an "
                          "encoder, then a head) or leave pretrain out")
    if len(heads) == 1:
        raise ConfigError(f"pretrain: every weight of the network {type(model).__name__} is in its layer "
                          f"'{heads[0]}', so it has no encoder before its head; leave pretrain out")
    return heads[-1]


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class SSLNet(nn.Module):
    """The job's network ``net`` (``head``: the name of its head, which is frozen here) with a
    ``projector`` and, for BYOL, a ``predictor``; ``forward`` gives projections (B, P).
    ``input_shape``: one image's (C, *spatial), for the dry run that finds the encoder's
    width."""

    def __init__(self, net: nn.Module, head: str, input_shape: tuple[int, ...], cfg: PretrainConfig):
        super().__init__()
        self.net, self.head, self.channels = net, head, int(input_shape[0])
        for p in getattr(net, head).parameters():
            p.requires_grad_(False)  # the head is not pretrained; the round loop pins what does not train
        self._features: torch.Tensor | None = None
        getattr(net, head).register_forward_pre_hook(self._tap)
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                sample = torch.zeros((2, *input_shape), device=next(net.parameters()).device)
                width = self.embed(sample, check_input=sample).shape[1]
        finally:
            net.train(was)
        self.projector = mlp(width, cfg.hidden_dim, cfg.projection_dim)
        self.predictor = mlp(cfg.projection_dim, cfg.hidden_dim, cfg.projection_dim) if cfg.method == "byol" else None

    def _tap(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0] if args and isinstance(args[0], torch.Tensor) else None
        raise _Reached

    def embed(self, x: torch.Tensor, check_input: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output for ``x`` (B, C, *spatial): (B, D), the head's input averaged
        over its spatial axes. ``check_input``: refuse a head that is given this tensor, the
        network's input itself (a layer registered last but called first)."""
        self._features = None
        try:
            self.net(x)
        except _Reached:
            pass
        f, self._features = self._features, None
        what = f"pretrain: the network's layer '{self.head}' (its last top-level layer with weights, taken as its head)"
        if f is None:
            raise ConfigError(f"{what} is not called with a tensor by its forward, so medfed cannot find its encoder; "
                              "leave pretrain out")
        if check_input is not None and f is check_input:
            raise ConfigError(f"{what} takes the network's input itself, so no encoder comes before it; use a network "
                              "whose last top-level layer is its head, or leave pretrain out")
        return f.flatten(2).mean(dim=2) if f.dim() > 2 else f

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projections (B, P) of images ``x`` (B, C, *spatial)."""
        return self.projector(self.embed(x))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """Projections (2B, P) of the two views in ``pairs`` (B, 2C, *spatial), as
        :class:`TwoViews` makes them: view a's B rows, then view b's."""
        c = self.channels
        if pairs.shape[1] != 2 * c:
            raise ValueError(f"SSLNet: expects two views of {c}-channel images side by side ({2 * c} channels), "
                             f"got {tuple(pairs.shape)}")
        return self.project(torch.cat([pairs[:, :c], pairs[:, c:]]))

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """BYOL's predictor on projections ``z``."""
        if self.predictor is None:
            raise ValueError("SSLNet: only BYOL's network has a predictor")
        return self.predictor(z)

    def encoder_keys(self) -> list[str]:
        """The job network's state-dict names outside its head: what the stage hands on."""
        head = f"{self.head}."
        return [k for k in self.net.state_dict() if not k.startswith(head)]

    def head_keys(self) -> list[str]:
        head = f"{self.head}."
        return [k for k in self.net.state_dict() if k.startswith(head)]


def ssl_network(model: nn.Module, input_shape: tuple[int, ...], cfg: PretrainConfig, seed: int) -> SSLNet:
    """:class:`SSLNet` around ``model`` (taken, not copied), its MLPs drawn from ``seed``."""
    head = encoder_head(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SSLNet(model, head, input_shape, cfg)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of projections ``z1``, ``z2`` (B, P), row i of each the two
    views of one image: the mean over the 2B projections of ``-log(exp(s_ip / t) / sum_{k !=
    i} exp(s_ik / t))``, s the cosine similarity, p the partner."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partners)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)``, the mean over the batch; ``z`` (the target's) carries no gradient."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


class TwoViews:
    """The step's augmentation during pretraining (an ``Augment``, data/base.py): each batch
    (B, C, *spatial) becomes its two views side by side, (B, 2C, *spatial), both made by
    ``steps`` with seeds drawn from the batch's seed. Labels pass through."""

    def __init__(self, steps: list, dims: int):
        self.augment = build_augment(steps, None, dims, segmentation=False)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        a_seed, b_seed = (int(v) & 0x7FFFFFFF for v in np.random.SeedSequence([seed, 0x55C1]).generate_state(2))
        a, _ = self.augment(images, labels, a_seed)
        b, _ = self.augment(images, labels, b_seed)
        return torch.cat([a, b], dim=1), labels


def _ssl_net(model: nn.Module) -> SSLNet:
    if not isinstance(model, SSLNet):
        raise TypeError(f"a pretraining hook trains an SSLNet, got {type(model).__name__}")
    return model


class SimCLR(SiteHook):
    """See the module docstring. Keeps no state across rounds. ``outputs``: the step's
    projections of the batch's two views, (2B, P)."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def batch_loss(self, model: nn.Module, images: torch.Tensor, outputs: torch.Tensor,
                   labeled: torch.Tensor) -> torch.Tensor | None:
        n = len(images)
        return nt_xent(outputs[:n], outputs[n:], self.cfg.tau)


class BYOL(SiteHook):
    """See the module docstring. ``target``: the moving average, a state dict of the SSLNet
    (None before the site's first training); ``outputs``: the online projections of the
    batch's two views, (2B, P)."""

    state_fields = ("target",)

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.target: Params | None = None

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        self.target = average_start(self.target, model.state_dict(), next(model.parameters()).device)

    def batch_loss(self, model: nn.Module, images: torch.Tensor, outputs: torch.Tensor,
                   labeled: torch.Tensor) -> torch.Tensor | None:
        assert self.target is not None, "on_train_start sets the target"
        net, n = _ssl_net(model), len(images)
        p = net.predict(outputs)
        buffers = {b for b, _ in net.named_buffers()}
        with torch.no_grad():  # batch statistics, as the online network; its running ones stay the average
            t = functional_call(net, {k: v.clone() if k in buffers else v for k, v in self.target.items()}, (images,))
        return byol_loss(p[:n], t[n:]) + byol_loss(p[n:], t[:n])

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        assert self.target is not None
        moving_average(self.target, model.state_dict(), self.cfg.decay)


def make_ssl_hook(cfg: PretrainConfig) -> SimCLR | BYOL:
    """A fresh hook of ``cfg.method`` (one per site)."""
    return SimCLR(cfg) if cfg.method == "simclr" else BYOL(cfg)


class PretrainSite:
    """One site during the pretraining stage: ``fit`` and ``evaluate`` as
    :class:`~medfed.site.app.SiteApp` answers them, over ``net`` (an :class:`SSLNet`, a work
    buffer the sites of one process may share) and every training image of ``data``, each
    counted as unlabeled. The update's ``loss`` is the self-supervised loss; ``evaluate``
    scores nothing (the stage has no labeled metric)."""

    def __init__(self, data: SiteData, job: Job, net: SSLNet, device: torch.device):
        if job.pretrain is None:
            raise ValueError("PretrainSite: the job has no pretrain section")
        self.name = data.name
        self.train = with_labeled(data.train, torch.zeros(len(data.train), dtype=torch.bool))
        self.net, self.device = net, device
        self.task = build_task(job)
        self.hook = make_ssl_hook(job.pretrain)
        self.views = TwoViews(job.pretrain.view_steps(), data.train.spatial_dims)

    def fit(self, params: Params, plan: RoundPlan) -> Update:
        try:
            self.net.load_state_dict(params, strict=True)
        except (RuntimeError, KeyError) as e:
            raise SiteError(self.name, f"pretraining parameters do not fit the network: {e}") from None
        self.hook.on_train_start(self.net, plan)
        stats = train_local(self.net, self.train, self.task, plan.train, self.hook, self.device, augment=self.views)
        return Update(site=self.name, round=plan.round, params=get_params(self.net), num_examples=len(self.train),
                      num_steps=stats.num_steps, metrics={Metric.LOSS: stats.mean_loss})

    def evaluate(self, params: Params, splits: tuple[Split, ...], arm: Arm) -> list[EvalResult]:
        return []

    def exchange(self, topic: str, rnd: int, body: dict) -> dict:
        raise SiteError(self.name, f"the pretraining stage answers no protocol message ('{topic}')")
