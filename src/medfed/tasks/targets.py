"""What one example's training target looks like for a task: the labels a site sends the
server in split learning without the U (``topology: {kind: split, u_shaped: false}``), where
the server holds the loss and so must check each batch's labels before it computes with
them (transport/grpc/splitting.py).

The targets are those the data holds (data/base.py ``ArraySplit``): int64 class indices
(B,) for binary and multi-class labels, float32 0/1 (B, K) for multi-label, int64 masks of
class indices with the images' spatial shape for segmentation, float32 images of the
input's shape for reconstruction (the fully sampled image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from medfed.config import ReconstructionTaskConfig, SegmentationTaskConfig, TaskConfig


@dataclass(frozen=True)
class TargetSpec:
    """One example's target: its ``shape``, its ``dtype``; ``classes``: int64 class indices
    lie in [0, classes) (None: not indices); ``unit``: float values lie in [0, 1]
    (multi-label); ``what``: its name in messages."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    classes: int | None
    unit: bool
    what: str

    def problem(self, labels: torch.Tensor, batch: int) -> str | None:
        """Why ``labels`` are not the targets of a batch of ``batch`` examples (None: they are)."""
        if labels.dtype != self.dtype:
            return f"{self.what}: {labels.dtype}, expected {self.dtype}"
        if tuple(labels.shape) != (batch, *self.shape):
            return (f"{self.what} of shape {tuple(labels.shape)}, expected {(batch, *self.shape)} (one per example "
                    "of the activations sent)")
        if labels.dtype.is_floating_point and not bool(torch.isfinite(labels).all()):
            return f"{self.what}: holds NaN or Inf"
        if self.classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            return (f"{self.what}: class index {int(labels.min()) if int(labels.min()) < 0 else int(labels.max())} "
                    f"outside [0, {self.classes - 1}] (task.num_classes: {self.classes})")
        if self.unit and labels.numel() and (float(labels.min()) < 0.0 or float(labels.max()) > 1.0):
            return f"{self.what}: values outside [0, 1]"
        return None


def target_spec(task: TaskConfig | SegmentationTaskConfig | ReconstructionTaskConfig,
                input_shape: tuple[int, ...]) -> TargetSpec:
    """The target of one example of ``input_shape`` (C, spatial...) for the job's ``task``."""
    if task.kind == "reconstruction":
        return TargetSpec(tuple(input_shape), torch.float32, None, False, "reconstruction targets")
    if task.kind == "segmentation":
        return TargetSpec(tuple(input_shape[1:]), torch.int64, task.num_classes, False, "masks")
    if task.labels == "multilabel":
        return TargetSpec((task.num_classes,), torch.float32, None, True, "labels")
    return TargetSpec((), torch.int64, task.num_classes, False, "labels")
