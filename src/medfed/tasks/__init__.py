"""What is learned: the loss, the inference and the metrics of a task.

Every task object offers the same four things, which the local training step and
evaluation use without knowing the task:

* ``loss(logits, target)``: the mean training loss of a batch;
* ``infer(model, images)``: logits for a batch in eval mode (segmentation may run a
  sliding window over images larger than the training patch);
* ``evaluator()``: a fresh accumulator with ``add(logits, target)`` per batch and
  ``result()`` giving the split's metrics (``None`` where a metric is undefined);
* ``monitor``: the name of the metric that picks the best model on val.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

from medfed.core.types import Metric

if TYPE_CHECKING:
    from medfed.config import Job, ReconstructionTaskConfig, SegmentationTaskConfig, TaskConfig
    from medfed.tasks.classification import ClassificationTask
    from medfed.tasks.reconstruction import ReconstructionTask
    from medfed.tasks.segmentation import SegmentationTask

    Task = Union[ClassificationTask, SegmentationTask, ReconstructionTask]


def build_task(job: "Job") -> "Task":
    """The task object of ``job``: classification, segmentation with the job's patch, or
    reconstruction."""
    if job.task.kind == "reconstruction":
        from medfed.tasks.reconstruction import ReconstructionTask

        return ReconstructionTask(job.task)
    if job.task.kind == "segmentation":
        from medfed.tasks.segmentation import SegmentationTask

        patch = tuple(job.transforms.patch) if job.transforms.patch is not None else None
        return SegmentationTask(job.task, patch=patch)
    from medfed.tasks.classification import ClassificationTask

    return ClassificationTask(job.task)


UNIT = (0.0, 1.0)


def metric_bounds(
    task: "TaskConfig | SegmentationTaskConfig | ReconstructionTaskConfig",
) -> dict[str, tuple[float, float]]:
    """Every metric an evaluation of ``task`` (the job's task section) can report, with the
    closed range its values lie in: what the server accepts from a site (names outside this
    table, or values outside their range, are refused). Every evaluation also reports the
    mean ``loss`` (site/evaluate.py)."""
    loss = {Metric.LOSS.value: (0.0, math.inf)}
    if task.kind == "reconstruction":  # PSNR capped at tasks/reconstruction.PSNR_CAP_DB
        return loss | {Metric.PSNR.value: (-math.inf, 100.0), Metric.SSIM.value: (-1.0, 1.0),
                       Metric.NMSE.value: (0.0, math.inf)}
    if task.kind == "segmentation":
        fg = range(1, task.num_classes)
        out = loss | {Metric.DICE.value: UNIT} | {Metric.DICE.of_class(c): UNIT for c in fg}
        if task.hd95:  # a distance, in mm or voxels
            out |= {Metric.HD95.value: (0.0, math.inf)} | {Metric.HD95.of_class(c): (0.0, math.inf) for c in fg}
        return out
    out = loss | {Metric.ACCURACY.value: UNIT, Metric.AUC.value: UNIT}
    if task.labels != "binary":
        out |= {Metric.AUC.of_class(k): UNIT for k in range(task.num_classes)}
    return out
