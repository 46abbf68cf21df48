"""Segmentation, 2D and 3D: one softmax logit per class per pixel (or voxel).

Logits have shape (B, K, *spatial), K = ``num_classes`` with class 0 the background.
Masks are int64 (B, *spatial) of class indices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medfed.config import SegmentationTaskConfig
from medfed.core.errors import ConfigError
from medfed.core.types import Metric

# Sliding-window inference batches windows up to about this many voxels at a time (and
# never more than SW_MAX_BATCH windows): 64 windows of 128^2 in 2D, 1 of 96^3 in 3D.
SW_VOXEL_BUDGET = 2**20
SW_MAX_BATCH = 64
SW_OVERLAP = 0.25


class SegmentationTask:
    """Loss, inference and metrics for K-class segmentation.

    ``patch``: the spatial size the model trains on, when training uses patches. Images of
    another size are then segmented with a sliding window of that size (see :meth:`infer`).
    """

    def __init__(self, cfg: SegmentationTaskConfig, patch: tuple[int, ...] | None = None):
        from medfed.tasks.losses import segmentation_loss

        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.monitor = cfg.monitor
        self.patch = tuple(int(p) for p in patch) if patch is not None else None
        self._loss = segmentation_loss(cfg)  # default Dice + cross-entropy (tasks/losses.py)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The job's loss (default Dice + cross-entropy) of logits (B, K, *sp) against
        int64 masks (B, *sp): a scalar. Computed in float32 with autocast off, so float16
        logits from a CUDA autocast region neither overflow nor lose the small Dice terms."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class logits, got shape {tuple(logits.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._loss(logits.float(), masks.unsqueeze(1).long())

    def infer(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, *sp) of ``model`` (in eval mode) for images (B, C, *sp).

        Without a patch, or when the images have exactly the patch's size, the model sees
        the whole images. Otherwise MONAI's sliding-window inference runs windows of the
        patch size with overlap 0.25 (constant blending) and returns logits of the images'
        full size; a side shorter than the patch is zero-padded for the windows and
        cropped back, so images smaller than the patch work too.
        """
        spatial = tuple(images.shape[2:])
        if self.patch is None or spatial == self.patch:
            return model(images)
        if len(self.patch) != len(spatial):
            raise ValueError(f"patch {self.patch} has {len(self.patch)} sides but images are {len(spatial)}D")
        from monai.inferers import sliding_window_inference

        sw_batch = max(1, min(SW_MAX_BATCH, SW_VOXEL_BUDGET // math.prod(self.patch)))
        out = sliding_window_inference(images, self.patch, sw_batch, model, overlap=SW_OVERLAP, mode="constant")
        return torch.as_tensor(out)  # a plain tensor, not a MONAI MetaTensor

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K, *sp): softmax over the class axis."""
        return torch.softmax(logits.float(), dim=1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted masks (B, *sp) int64: the most likely class per pixel."""
        return logits.argmax(dim=1)

    def evaluator(self, spacing: Sequence[float] | None = None, distances: bool = True) -> SegmentationEvaluator:
        """A fresh accumulator of batches; ``spacing`` (mm per pixel or voxel along the
        spatial axes), when known, puts ``hd95`` in millimetres instead of pixels.
        ``distances: False`` skips the (costly) HD95 even when the task asks for it: the
        validation split needs only the monitored Dice."""
        return SegmentationEvaluator(self, spacing, distances)


class SegmentationEvaluator:
    """Per-image Dice (and 95% Hausdorff distance) per foreground class, streamed: each
    batch is reduced to a few numbers per image on arrival, no logits are kept.

    Definitions, per image and foreground class k (prediction = argmax of the logits):

    * Dice = 2 |P ∩ G| / (|P| + |G|). When k is absent from both the ground truth and the
      prediction it is undefined and left out of the means; when k is absent from the
      ground truth but predicted (a false positive on an empty mask) it is 0, so false
      alarms on images without a lesion count against the model.
    * HD95 = MONAI's symmetric 95th-percentile Hausdorff distance between the boundaries
      of P and G, in pixels, or in mm when the evaluator has a ``spacing``. It is
      undefined (and left out) when P or G is empty.

    ``result()`` gives ``dice_class_<k>`` (and ``hd95_class_<k>``) = mean over the images
    where it is defined, ``dice`` (and ``hd95``) = mean of those class means over the
    classes where they are defined; ``None`` where nothing is defined.
    """

    def __init__(self, task: SegmentationTask, spacing: Sequence[float] | None = None, distances: bool = True):
        self.task = task
        self.num_classes = task.num_classes
        self.hd95 = task.cfg.hd95 and distances
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        if self.hd95:
            try:
                import scipy.ndimage  # noqa: F401  MONAI's Hausdorff distance needs it on CPU
            except ImportError:
                raise ConfigError("task.hd95: the Hausdorff distance needs scipy; install it or set task.hd95: false") from None
        fg = self.num_classes - 1
        self._dice: list[list[float]] = [[] for _ in range(fg)]
        self._hd: list[list[float]] = [[] for _ in range(fg)]

    def add(
        self, logits: torch.Tensor, masks: torch.Tensor, spacings: Sequence[Sequence[float] | None] | None = None
    ) -> None:
        """Take one batch: logits (B, K, *sp) and int64 masks (B, *sp). ``spacings``: each
        example's spacing (a streamed split's examples may differ); where one is unknown,
        or none are given, the evaluator's own spacing is used."""
        from monai.metrics import compute_dice, compute_hausdorff_distance

        k = self.num_classes
        if logits.shape[1] != k or tuple(logits.shape[2:]) != tuple(masks.shape[1:]) or logits.shape[0] != masks.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} do not match masks {tuple(masks.shape)} for {k} classes")
        pred = logits.argmax(dim=1)
        masks = masks.to(pred.device).long()
        pred_oh = _one_hot(pred, k)
        gt_oh = _one_hot(masks, k)
        # ignore_empty=False gives 0 for a false positive on an empty mask, and 1 when both
        # are empty: the latter is made undefined here.
        dice = compute_dice(pred_oh, gt_oh, include_background=False, ignore_empty=False, num_classes=k)
        sp_axes = tuple(range(2, pred_oh.ndim))
        both_empty = (pred_oh[:, 1:].sum(sp_axes) == 0) & (gt_oh[:, 1:].sum(sp_axes) == 0)
        dice = dice.float().masked_fill(both_empty, float("nan")).cpu().numpy()
        _collect(self._dice, dice)
        if self.hd95:
            with warnings.catch_warnings():  # MONAI warns on each empty class: expected here
                warnings.simplefilter("ignore")
                hd = compute_hausdorff_distance(
                    pred_oh.cpu(), gt_oh.cpu(), include_background=False, percentile=95,
                    spacing=self._spacing(spacings, len(masks)),
                )
            _collect(self._hd, torch.as_tensor(hd).float().numpy())

    def _spacing(self, spacings, n: int):
        """One spacing for the batch when its examples share it, else one per example."""
        if not spacings or any(s is None for s in spacings):
            return self.spacing
        per = [[float(v) for v in s] for s in spacings]
        return per[0] if all(p == per[0] for p in per) else per

    def result(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        dice_means = [_mean(v) for v in self._dice]
        out[Metric.DICE] = _mean([m for m in dice_means if m is not None])
        for c, m in enumerate(dice_means, start=1):
            out[Metric.DICE.of_class(c)] = m
        if self.hd95:
            hd_means = [_mean(v) for v in self._hd]
            out[Metric.HD95] = _mean([m for m in hd_means if m is not None])
            for c, m in enumerate(hd_means, start=1):
                out[Metric.HD95.of_class(c)] = m
        return out


def _one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, *sp) class indices to (B, K, *sp) float one-hot."""
    return torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float()


def _collect(per_class: list[list[float]], values: np.ndarray) -> None:
    """Append the finite entries of ``values`` (B, K-1) to their class's list."""
    for c, column in enumerate(values.T):
        per_class[c].extend(float(v) for v in column if math.isfinite(v))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
