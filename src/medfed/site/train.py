"""THE local training step. Every site, every algorithm and every baseline trains here.

Algorithms plug in through their :class:`~medfed.algorithms.base.SiteHook`; nothing in
this file knows which algorithm runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from medfed.algorithms.base import SiteHook
from medfed.core.types import TrainSettings
from medfed.data.base import Augment, Examples, Planned
from medfed.privacy import dpsgd
from medfed.privacy.dpsgd import SampleDP
from medfed.site.device import seed_device
from medfed.site.evaluate import mean_loss

if TYPE_CHECKING:
    from medfed.tasks import Task


@dataclass(frozen=True)
class TrainStats:
    num_steps: int
    mean_loss: float


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering ``range(n)`` once.

    A trailing batch of one example is dropped when n > 1: batch norm cannot normalise
    over a single example in training mode.
    """
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) == 1 and n > 1:
            return
        yield idx


def plan_epochs(
    draw: Callable[[int, int, torch.Generator], Iterator[torch.Tensor]], n: int, settings: TrainSettings,
    gen: torch.Generator, augmented: bool,
) -> Iterator[Planned]:
    """Every batch of ``settings.local_epochs`` passes, in order: its examples from
    ``draw`` and, when ``augmented``, its augmentation seed drawn from ``gen`` right after
    them (an empty batch gets none). Drawn lazily, so a loader reading ahead draws in the
    same order as the loop would."""
    for _ in range(settings.local_epochs):
        for idx in draw(n, settings.batch_size, gen):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) if augmented and len(idx) else None
            yield Planned(idx, seed)


def supervised_loss(task: "Task", outputs: torch.Tensor, labels: torch.Tensor,
                    labeled: torch.Tensor | None) -> torch.Tensor | None:
    """The task loss over the examples that have a label (``labeled``, bool (B,); None: all
    of them); None when none has."""
    if labeled is None or bool(labeled.all()):
        return task.loss(outputs, labels)
    if not bool(labeled.any()):
        return None
    return task.loss(outputs[labeled], labels[labeled])


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """A fresh optimizer over the parameters that currently require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def train_local(
    model: nn.Module,
    data: Examples,
    task: "Task",
    settings: TrainSettings,
    hook: SiteHook,
    device: torch.device,
    frozen: frozenset[str] = frozenset(),
    augment: Augment | None = None,
    private: SampleDP | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``settings.local_epochs`` passes over ``data``.

    A fresh optimizer is made each round (its momentum does not carry over). Mixed
    precision (float16 autocast with loss scaling) is used on CUDA. Parameters named in
    ``frozen`` are not trained (FedRep's phases); batch-norm statistics still update.
    ``augment`` (the job's augmentation and patch cropping) transforms every batch on the
    CPU before it moves to the device, seeded from ``settings.seed``. A streamed split is
    read (and augmented) by its loader's workers, batch by batch, in the planned order.

    ``private`` (default None) trains with sample-level DP-SGD (privacy/dpsgd.py): each
    epoch is :func:`~medfed.privacy.dpsgd.steps_per_epoch` Poisson-sampled batches (from
    the same seeded generator), the optimizer clips each example's gradient and adds
    noise, and mixed precision is off (Opacus clips unscaled per-example gradients). A
    model with batch norm is a ModelError (``model.norm: group`` avoids it). The hook's
    ``on_after_backward`` then sees the clipped, noised gradient. A hook whose
    ``extra_loss`` returns a term (FedProx, MOON, FedDyn, Ditto's proximal pull) is a
    ValueError: that term's gradient would bypass the clipping. An empty Poisson batch
    (probability (1 - q)^n) skips the forward pass but still takes a noise-only step; it
    counts in ``num_steps`` but not in ``mean_loss``.

    A hook with ``wants_start_loss`` first gets the task loss of ``model`` as it starts, on
    ``data`` in eval mode (:func:`~medfed.site.evaluate.mean_loss`): one more pass over the
    split, without augmentation.
    """
    if hook.wants_start_loss:  # e.g. q-FedAvg: the loss of the model the site received, before training
        hook.on_start_loss(mean_loss(model, data, task, device))
    params = dict(model.named_parameters())
    was = {n: params[n].requires_grad for n in frozen if n in params}
    for n in was:
        params[n].requires_grad_(False)
    try:
        return _train(model, data, task, settings, hook, device, augment, private)
    finally:
        for n, flag in was.items():
            params[n].requires_grad_(flag)


def _train(
    model: nn.Module, data: Examples, task: "Task", settings: TrainSettings, hook: SiteHook,
    device: torch.device, augment: Augment | None, private: SampleDP | None,
) -> TrainStats:
    seed_device(settings.seed, device)  # dropout and any other randomness in the model
    gen = torch.Generator().manual_seed(settings.seed)
    amp = device.type == "cuda" and private is None  # Opacus clips unscaled gradients
    scaler = torch.amp.GradScaler("cuda") if amp else None
    # mixed precision on CUDA; elsewhere no autocast context (a disabled one still costs microseconds a batch)
    autocast = partial(torch.autocast, device_type=device.type, dtype=torch.float16) if amp else nullcontext
    optimizer = make_optimizer(model, settings)
    model.train()
    if private is None:
        draw, training = batches, nullcontext(optimizer)
    else:
        draw = dpsgd.poisson_batches
        training = dpsgd.dp_sgd(
            model, optimizer, private,
            expected_batch_size=dpsgd.expected_batch_size(len(data), settings.batch_size),
            generator=private.noise_generator(settings.seed, device),
            after_noise=lambda: hook.on_after_backward(model),
        )
    steps, losses, loss_sum = 0, 0, 0.0
    plan = plan_epochs(draw, len(data), settings, gen, augment is not None)
    with training as optimizer:
        for batch in data.batches(plan, augment, pin=device.type == "cuda"):
            if len(batch) == 0:
                if private is not None:  # an empty Poisson draw still takes a noise-only step
                    dpsgd.noise_step(optimizer)
                    steps += 1
                continue  # else: every file of the batch was skipped as unreadable
            x = batch.images.to(device, non_blocking=True)
            y = batch.labels.to(device, non_blocking=True)
            labeled = (torch.ones(len(x), dtype=torch.bool) if batch.labeled is None else batch.labeled).to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                out = model(x)
                # the task loss of the labeled examples, plus the hook's term of the batch (semi-supervised)
                every = labeled if batch.labeled is not None else None  # None: all labeled, nothing to check
                terms = [t for t in (supervised_loss(task, out, y, every), hook.batch_loss(model, x, out, labeled))
                         if t is not None]
                if not terms:  # no label and no term for the unlabeled examples: no step
                    continue
                loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
                extra = hook.extra_loss(model)
                if extra is not None:
                    if private is not None:
                        raise ValueError(
                            "sample-level DP-SGD (dp_sgd) cannot add the algorithm's extra loss "
                            "term (FedProx, MOON, FedDyn, Ditto's proximal pull): its gradient is "
                            "not per example and would bypass the clipping; use FedAvg or another "
                            "algorithm without one"
                        )
                    loss = loss + extra
            if hook.perturbs and private is not None:
                raise ValueError("sample-level DP-SGD (dp_sgd) cannot take the algorithm's perturbed gradient "
                                 "(HarmoFL): it is not a per-example gradient DP-SGD clips; leave dp_sgd out")
            if scaler is not None:
                scaler.scale(loss).backward()
                if hook.perturbs:
                    _perturbed_gradient(model, x, y, labeled, task, hook, optimizer, scaler)
                scaler.unscale_(optimizer)
                hook.on_after_backward(model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if hook.perturbs:
                    _perturbed_gradient(model, x, y, labeled, task, hook, optimizer, None)
                if private is None:  # under DP-SGD it runs after the noise (after_noise)
                    hook.on_after_backward(model)
                optimizer.step()
            hook.on_step_end(model)
            steps += 1
            losses += 1
            loss_sum += float(loss.detach())
    return TrainStats(num_steps=steps, mean_loss=loss_sum / max(losses, 1))


def _perturbed_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, labeled: torch.Tensor, task: "Task", hook: SiteHook,
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
) -> None:
    """A sharpness-aware step's second pass (``hook.perturbs``, HarmoFL): with the batch's
    gradient at the weights ``w`` in place, the hook moves the weights; the gradient of the
    same objective as the first pass (the labeled examples' task loss, the hook's batch
    term, its extra term; scaled like the first) is taken there, the weights go back to
    ``w``, and the optimizer then steps from ``w`` with that gradient."""
    moves = hook.perturb(model)
    if moves is None:
        return
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=scaler is not None):
        out = model(x)
        terms = [t for t in (supervised_loss(task, out, y, labeled), hook.batch_loss(model, x, out, labeled),
                             hook.extra_loss(model)) if t is not None]
    if terms:
        again = terms[0]
        for t in terms[1:]:
            again = again + t
        (scaler.scale(again) if scaler is not None else again).backward()
    hook.unperturb(model, moves)
