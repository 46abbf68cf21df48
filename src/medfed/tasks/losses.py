"""The training losses a job's ``task.loss`` names (config/model.py TaskConfig and
SegmentationTaskConfig), and the user's own by import path.

A loss here is a callable ``(logits, target) -> scalar tensor``. Classification targets
are as the split holds them (int64 class indices (B,), or float 0/1 rows (B, K)); a
segmentation loss gets masks with a channel axis, (B, 1, *spatial) int64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from medfed.config import ImportLossConfig, SegmentationTaskConfig, TaskConfig
from medfed.core.errors import ConfigError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def imported_loss(cfg: ImportLossConfig) -> Loss:
    """The user's loss: ``cfg.factory`` imported here and called with ``cfg.args``."""
    from medfed.networks import import_callable

    factory = import_callable(cfg.factory, "task.loss.import")
    try:
        loss = factory(**cfg.args)
    except Exception as e:  # the user's code
        raise ConfigError(f"task.loss.import: '{cfg.factory}' raised {type(e).__name__} when called with "
                          f"task.loss.args {cfg.args}: {e}") from None
    if not callable(loss):
        raise ConfigError(f"task.loss.import: '{cfg.factory}' returned a {type(loss).__name__}, not a callable "
                          "(logits, target) -> loss")
    return loss  # type: ignore[return-value]


def segmentation_loss(cfg: SegmentationTaskConfig) -> Loss:
    """One of MONAI's losses on softmax outputs with one-hot targets. The Dice terms leave
    the background out (it would dominate them, and the metric ignores it too) and are
    taken over the whole batch (batch=True), so an image where a class is absent neither
    gives a meaningless per-image term nor is ignored; cross-entropy and focal terms cover
    every class."""
    if isinstance(cfg.loss, ImportLossConfig):
        return imported_loss(cfg.loss)
    from monai import losses  # MONAI is imported only where used

    dice = {"include_background": False, "to_onehot_y": True, "softmax": True, "batch": True}
    if cfg.loss == "dice_ce":
        return losses.DiceCELoss(**dice)
    if cfg.loss == "dice":
        return losses.DiceLoss(**dice)
    if cfg.loss == "dice_focal":
        return losses.DiceFocalLoss(**dice)
    if cfg.loss == "tversky":
        return losses.TverskyLoss(**dice)
    if cfg.loss == "focal":
        return losses.FocalLoss(to_onehot_y=True, use_softmax=True)
    raise ConfigError(f"task.loss: unknown segmentation loss '{cfg.loss}'")  # pragma: no cover - the schema


def _weighted_binary(weights: torch.Tensor) -> Loss:
    """Binary cross-entropy on the one logit, each example weighted by its class's weight:
    sum(w_i l_i) / sum(w_i), the mean PyTorch's weighted cross-entropy takes."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = weights.to(logits.device)[labels.long()]
        per = F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype), reduction="none")
        return (w * per).sum() / w.sum()

    return loss


def classification_loss(cfg: TaskConfig) -> Loss:
    """Cross-entropy for ``cfg.labels`` (weighted by ``cfg.class_weights`` when given), or
    the user's loss. Binary and multi-label: binary cross-entropy with logits on the one
    logit or on each label's; multi-class: softmax cross-entropy."""
    if isinstance(cfg.loss, ImportLossConfig):
        return imported_loss(cfg.loss)
    if cfg.class_weights is None:  # today's losses, unchanged
        ce, bce = nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()
        if cfg.labels == "binary":
            return lambda logits, labels: bce(logits[:, 0], labels.to(logits.dtype))
        if cfg.labels == "multiclass":
            return ce
        return lambda logits, labels: bce(logits, labels.to(logits.dtype))
    w = torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.labels == "binary":
        return _weighted_binary(w)
    if cfg.labels == "multiclass":
        return lambda logits, labels: F.cross_entropy(logits, labels, weight=w.to(logits.device))
    # multi-label: each label's term weighted, the mean over batch and labels
    return lambda logits, labels: F.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype), weight=w.to(logits.device))
