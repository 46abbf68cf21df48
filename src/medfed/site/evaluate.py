"""Evaluation of a model on one split of a site's data."""

from __future__ import annotations

import torch
from torch import nn

from medfed.data.base import ArraySplit
from medfed.tasks.classification import ClassificationTask

EVAL_BATCH = 256


@torch.no_grad()
def evaluate_split(
    model: nn.Module, data: ArraySplit, task: ClassificationTask, device: torch.device
) -> dict[str, float | None]:
    """Task metrics plus the mean ``loss`` of ``model`` (eval mode) on ``data``."""
    model.eval()
    probs, loss_sum = [], 0.0
    amp = device.type == "cuda"
    for start in range(0, len(data), EVAL_BATCH):
        x = data.images[start : start + EVAL_BATCH].to(device)
        y = data.labels[start : start + EVAL_BATCH].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(task.loss(logits, y)) * len(x)
        probs.append(task.probabilities(logits).cpu())
    metrics = task.metrics(torch.cat(probs), data.labels)
    metrics["loss"] = loss_sum / max(len(data), 1)
    return metrics
