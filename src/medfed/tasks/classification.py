"""Classification: binary, multi-class and multi-label.

Logits have shape (B, K): K = 1 for binary (sigmoid), K classes for multi-class (softmax),
K labels for multi-label (independent sigmoids). Labels are int64 (B,) class indices for
binary and multi-class, float32 (B, K) of 0/1 for multi-label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medfed.config import TaskConfig
from medfed.core.types import Metric


class ClassificationTask:
    """Loss, probabilities and metrics for one classification setting."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.labels = cfg.labels
        self.num_classes = cfg.num_classes
        self.monitor = cfg.monitor
        from medfed.tasks.losses import classification_loss

        self._loss = classification_loss(cfg)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch: the job's ``task.loss`` (default: BCE-with-logits for
        binary and multi-label, cross-entropy for multi-class; see tasks/losses.py)."""
        return self._loss(logits, labels)

    def infer(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``model`` (in eval mode) for a batch of images."""
        return model(images)

    def evaluator(self, spacing: tuple[float, ...] | None = None, distances: bool = True) -> "ClassificationEvaluator":
        """A fresh accumulator of batches; its ``result()`` gives the split's metrics.
        (``spacing`` and ``distances`` are for segmentation and unused here.)"""
        return ClassificationEvaluator(self)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) positive-class probability for binary, (B, K) otherwise."""
        if self.labels == "binary":
            return torch.sigmoid(logits[:, 0])
        if self.labels == "multiclass":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    def metrics(self, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
        """Accuracy and ROC AUC (MONAI) on a whole split.

        ``auc`` is the macro average over the classes (or labels) for which AUC is
        defined (both values present); ``None`` when it is defined for none.
        Multi-class and multi-label also report ``auc_class_<i>``. Multi-label accuracy
        is the mean over labels of the per-label accuracy at threshold 0.5.
        """
        probs = probs.detach().float().cpu()
        labels = labels.detach().cpu()
        out: dict[str, float | None] = {}
        if self.labels == "binary":
            out[Metric.ACCURACY] = float(((probs >= 0.5).long() == labels).float().mean())
            out[Metric.AUC] = _auc(probs, labels)
            return out
        if self.labels == "multiclass":
            out[Metric.ACCURACY] = float((probs.argmax(1) == labels).float().mean())
            onehot = torch.nn.functional.one_hot(labels, self.num_classes)
        else:
            out[Metric.ACCURACY] = float(((probs >= 0.5).float() == labels).float().mean())
            onehot = labels
        per_class = [_auc(probs[:, k], onehot[:, k]) for k in range(self.num_classes)]
        defined = [v for v in per_class if v is not None]
        out[Metric.AUC] = float(np.mean(defined)) if defined else None
        for k, v in enumerate(per_class):
            out[Metric.AUC.of_class(k)] = v
        return out


class ClassificationEvaluator:
    """Collects the probabilities of every batch; the metrics need the whole split (AUC)."""

    def __init__(self, task: ClassificationTask):
        self.task = task
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, spacings: Sequence | None = None) -> None:
        """Take one batch (``spacings`` are for segmentation and unused here)."""
        self._probs.append(self.task.probabilities(logits.float()).cpu())
        self._labels.append(labels.cpu())

    def result(self) -> dict[str, float | None]:
        return self.task.metrics(torch.cat(self._probs), torch.cat(self._labels))


def _auc(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """ROC AUC of one column (None when only one class is present, or a score is not a
    number): the Mann-Whitney statistic, the probability that a positive example scores
    above a negative one, ties counting one half, computed from the scores' ranks (tied
    scores share their mean rank), in float64. The value of MONAI's ``compute_roc_auc``
    (tests/tasks check it against MONAI), without importing MONAI, which takes seconds the
    first time a site evaluates."""
    y = targets.long().flatten()
    if y.numel() == 0 or y.min() == y.max():
        return None
    s = scores.detach().double().flatten()
    if bool(torch.isnan(s).any()):
        return None
    order = torch.argsort(s)
    _, group, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # the 1-based rank of each group of ties' last score
    ranks = torch.empty_like(s)
    ranks[order] = (last - (counts.double() - 1) / 2)[group]  # the group's mean rank
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = y.numel() - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
