"""A site's side of split learning (``topology: {kind: split}``): its local training over
a network cut in three (medfed/cut.py), the middle held by the server.

U-shaped: the site runs the front on its images and the back with the loss on its labels;
batch by batch only two tensors leave it, through a :class:`SplitChannel`:

    site:   A = front(x)                  --- A --->   server: Z = middle(A)
    site:   loss = task.loss(back(Z), y)  <--- Z ---
    site:   dL/dZ by backward             -- dL/dZ ->  server: backward, step its optimizer
    site:   backward from A, step         <- dL/dA --

This is the one local training step (site/train.py) with the network's forward and
backward split at the cut: the same optimizer settings (:func:`make_optimizer`, fresh each
round, over the site's parts), the same planned batches and seeds (:func:`plan_epochs`,
:func:`batches`), the same augmentation and the same task loss; the server steps its own
optimizer over the middle with the same settings. So a site alone trains exactly what it
would train unsplit. Mixed precision is not used (float32 on every device).

Without the U (``u_shaped: false``) the site holds the front alone and the server the rest
with the loss; per batch, through a :class:`LabelChannel`:

    site:   A = front(x)                  --- A, y --->  server: loss(rest(A), y), backward, step
    site:   backward from A, step         <-- dL/dA ---

The batch's labels ``y`` leave the site. Examples without a label cannot take part: a batch
holding one is refused (its placeholder label would be trained on by the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from medfed.core.errors import ModelError, SiteError
from medfed.core.types import Metric, Params, RoundPlan, TrainSettings, Update
from medfed.cut import ModelCut, cut_model, tensor_bytes
from medfed.data.base import Augment, Examples
from medfed.models import get_params
from medfed.site.device import seed_device
from medfed.site.train import TrainStats, batches, make_optimizer, plan_epochs

if TYPE_CHECKING:
    from medfed.site.app import SiteApp
    from medfed.tasks import Task


class SplitChannel(Protocol):
    """One site's line to the party that holds the middle of the network, for one site's
    turn of training. Two calls per batch, in this order; tensors only, never objects."""

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """Send the activations at the cut of one batch (B, ...), get the middle's output
        for them (B, ...): the input of the site's back part."""
        ...

    def backward(self, gradient: torch.Tensor) -> torch.Tensor:
        """Send the gradient of the batch's loss with respect to that output (its shape);
        the other side steps its optimizer and returns the gradient with respect to the
        activations sent (their shape)."""
        ...


@runtime_checkable
class LabelChannel(Protocol):
    """One site's line to the party that holds the rest of the network and the loss (split
    learning without the U), for one site's turn. One call per batch."""

    def step(self, activations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Send the activations at the cut of one batch (B, ...) and its labels (B, ...); the
        other side computes the loss, steps its optimizer and returns the gradient of the
        loss with respect to the activations (their shape)."""
        ...


class InProcessChannel:
    """A :class:`SplitChannel` to a party in this process (``peer``, e.g. the server's
    :class:`~medfed.server.split.MiddleSession`): each tensor is copied as it crosses, as a
    network would, and its bytes counted. ``sent``: the bytes the site sent (activations,
    gradients at the back's input, labels without the U); ``received``: those it got back.
    A :class:`LabelChannel` too, when ``peer`` has ``step``."""

    def __init__(self, peer: SplitChannel | LabelChannel):
        self.peer = peer
        self.sent = 0
        self.received = 0

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self._reply(self.peer.forward(self._send(activations)))

    def backward(self, gradient: torch.Tensor) -> torch.Tensor:
        return self._reply(self.peer.backward(self._send(gradient)))

    def step(self, activations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        peer = self.peer
        if not isinstance(peer, LabelChannel):
            raise ModelError("split learning without the U needs a peer that holds the loss")
        return self._reply(peer.step(self._send(activations), self._send(labels)))

    def _send(self, t: torch.Tensor) -> torch.Tensor:
        self.sent += tensor_bytes(t)
        return t.detach().clone()

    def _reply(self, t: torch.Tensor) -> torch.Tensor:
        self.received += tensor_bytes(t)
        return t.detach().clone()


def fit_split(app: SiteApp, params: Params, plan: RoundPlan, channel: SplitChannel | LabelChannel, cut: str,
              head: str | None, u_shaped: bool = True) -> Update:
    """One round of split training at ``app``'s site: load the site's parts of the network
    (``params``: exactly the entries of front and back), train them with the middle behind
    ``channel``, and return them trained (the update carries the site's parts only; without
    the U no loss, which the server computed)."""
    parts = cut_model(app.model, cut, head, u_shaped)
    if params.keys() != parts.site_keys:
        odd = sorted(params.keys() ^ parts.site_keys)[:3]
        raise SiteError(app.name, f"the site's parts of the split network do not match what was sent: {odd}")
    app.model.load_state_dict(params, strict=False)  # the middle's entries are the server's, never loaded here
    augment = app.mixed if app.mixed is not None else app.augment  # FedDG's mixing when the job shares amplitudes
    stats = train_site_parts(parts, app.data.train, app.task, plan.train, channel, app.device, augment)
    trained = {k: v for k, v in get_params(app.model).items() if k in parts.site_keys}
    metrics = {Metric.LOSS: stats.mean_loss} if u_shaped else {}
    return Update(site=app.name, round=plan.round, params=trained, num_examples=len(app.data.train),
                  num_steps=stats.num_steps, metrics=metrics)


def train_site_parts(
    parts: ModelCut, data: Examples, task: "Task", settings: TrainSettings, channel: SplitChannel | LabelChannel,
    device: torch.device, augment: Augment | None = None,
) -> TrainStats:
    """Train ``parts.front`` and ``parts.back`` in place for ``settings.local_epochs``
    passes over ``data``, the middle behind ``channel`` (see the module docstring). Without
    the U (``parts.back`` None) ``channel`` is a :class:`LabelChannel` and the stats' loss
    is nan (the server has it)."""
    seed_device(settings.seed, device)  # dropout and any other randomness, as in site/train.py
    gen = torch.Generator().manual_seed(settings.seed)
    site = parts.site_parts()
    optimizer = optimizer_for(site, settings)
    site.train()
    steps, loss_sum = 0, 0.0
    plan = plan_epochs(batches, len(data), settings, gen, augment is not None)
    for batch in data.batches(plan, augment, pin=device.type == "cuda"):
        if len(batch) == 0:
            continue  # every file of the batch was skipped as unreadable
        x = batch.images.to(device, non_blocking=True)
        y = batch.labels.to(device, non_blocking=True)
        site.zero_grad(set_to_none=True)
        activations = parts.front(x)
        if parts.back is None:  # without the U: the labels go with the activations, the server has the loss
            labeled = getattr(batch, "labeled", None)
            if labeled is not None and not bool(labeled.all()):
                raise ModelError("topology.u_shaped: false sends each training example's label to the server, but "
                                 "this site's training split has examples without a label (data.labeled_fraction or "
                                 "unlabeled rows); use topology.u_shaped: true, where unlabeled examples stay out of "
                                 "the loss at the site")
            below = channel.step(activations.detach(), y).to(device)
            if activations.requires_grad:
                activations.backward(below)
            if optimizer is not None:
                optimizer.step()
            steps += 1
            continue
        top = channel.forward(activations.detach()).to(device).requires_grad_()
        out = parts.back(top)
        # as in the local step: examples without a label (data.labeled_fraction) run forward
        # (batch-norm statistics) but take no part in the loss; a batch with none takes no step
        labeled = getattr(batch, "labeled", None)
        if labeled is not None and not bool(labeled.all()):
            if not bool(labeled.any()):
                continue
            keep = labeled.to(device)
            out, y = out[keep], y[keep]
        loss = task.loss(out, y)
        loss.backward()
        if top.grad is None:
            raise ModelError("topology.head: the loss does not depend on the server's output; name the module "
                             "where the network's last layers begin")
        below = channel.backward(top.grad).to(device)
        if activations.requires_grad:  # else the front is frozen: nothing to train below the cut
            activations.backward(below)
        if optimizer is not None:
            optimizer.step()
        steps += 1
        loss_sum += float(loss.detach())
    mean = loss_sum / max(steps, 1) if parts.back is not None else float("nan")
    return TrainStats(num_steps=steps, mean_loss=mean)


def optimizer_for(module: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer | None:
    """The local step's optimizer (:func:`make_optimizer`) over ``module``'s trainable
    parameters; None when it has none (a part without weights, such as a pooling, or all
    frozen by ``model.freeze``)."""
    if not any(p.requires_grad for p in module.parameters()):
        return None
    return make_optimizer(module, settings)
