"""Evaluation of a model on one split of a site's data."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from medfed.data.base import Examples, Planned
from medfed.core.types import Metric

if TYPE_CHECKING:
    from medfed.tasks import Task

log = logging.getLogger("medfed")

EVAL_BATCH = 256
VOXELS_PER_BATCH = 2**22  # bounds a batch's memory for large images and volumes


def eval_batch_size(data: Examples) -> int:
    """Examples per evaluation batch: up to 256, fewer for large images or volumes."""
    per_example = max(1, math.prod(data.shape))
    return max(1, min(EVAL_BATCH, VOXELS_PER_BATCH // per_example))


def _plan(data: Examples) -> list[Planned]:
    """The whole split in order, in evaluation batches."""
    step = eval_batch_size(data)
    return [Planned(torch.arange(start, min(start + step, len(data)))) for start in range(0, len(data), step)]


@torch.no_grad()
def mean_loss(model: nn.Module, data: Examples, task: "Task", device: torch.device) -> float | None:
    """The mean task loss of ``model`` (eval mode, as evaluation infers) on ``data``, e.g.
    the global model's on a site's training split before it trains (q-FedAvg's F_k). None
    when the model's outputs are not finite or no example could be read."""
    model.eval()
    loss_sum, seen = 0.0, 0
    for batch in data.batches(_plan(data), pin=device.type == "cuda"):
        if len(batch) == 0:
            continue
        x, y = batch.images, batch.labels
        if batch.labeled is not None:  # a training split's unlabeled examples hold no loss
            x, y = x[batch.labeled], y[batch.labeled]
            if not len(x):
                continue
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = task.infer(model, x)
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):
            return None
        loss_sum += float(task.loss(logits, y)) * len(x)
        seen += len(x)
    return loss_sum / seen if seen else None


@torch.no_grad()
def evaluate_split(
    model: nn.Module, data: Examples, task: "Task", device: torch.device, distances: bool = True,
    where: str = "",
) -> dict[str, float | None]:
    """Task metrics plus the mean ``loss`` of ``model`` (eval mode) on ``data``, read in
    batches (a streamed split file by file). ``distances: False`` leaves out
    segmentation's surface distances (HD95), measured in each example's own spacing.

    A model whose outputs hold NaN or Inf (e.g. a batch-norm variance driven below zero
    by an attack) gets every metric undefined (None) rather than figures computed from
    them, and a warning naming ``where`` (e.g. the site and split).

    An empty split (a site without labeled examples there, data/labels.py) has no metrics:
    an empty dict, never figures of nothing."""
    if len(data) == 0:
        log.debug("%s: no examples; nothing evaluated", where or "evaluation")
        return {}
    model.eval()
    evaluator = task.evaluator(spacing=data.spacing, distances=distances)
    broken = 0  # examples whose outputs are not finite
    loss_sum = 0.0
    amp = device.type == "cuda"
    seen = 0
    for batch in data.batches(_plan(data), pin=device.type == "cuda"):
        if len(batch) == 0:  # every file of the batch skipped as unreadable
            continue
        x, y = batch.images.to(device), batch.labels.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = task.infer(model, x)
        logits = logits.float()
        broken += int((~torch.isfinite(logits.reshape(len(x), -1))).any(1).sum())
        loss_sum += float(task.loss(logits, y)) * len(x)
        evaluator.add(logits, y, spacings=batch.spacings)
        seen += len(x)
    metrics = evaluator.result()
    metrics[Metric.LOSS] = loss_sum / max(seen, 1)
    if broken:
        log.warning("%s: the model's outputs hold NaN or Inf for %d of %d examples; its metrics are left "
                    "undefined", where or "evaluation", broken, len(data))
        return {name: None for name in metrics}
    return metrics
