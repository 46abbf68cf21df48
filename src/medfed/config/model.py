"""The job's ``model`` and ``task`` sections: a network by name, and the task (classification
or segmentation) that fixes its outputs, loss and metrics."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from medfed.core.schema import Count, Frozen

CLASSIFIERS = ("small_cnn", "densenet121", "resnet18", "resnet50")
SEGMENTERS = ("unet", "segresnet")


class ModelConfig(Frozen):
    """A network by name, 2D or 3D as the data is. Classifiers: ``small_cnn`` (for CPU
    runs), MONAI ``densenet121``, ``resnet18``, ``resnet50``. Segmenters: MONAI ``unet``
    and ``segresnet``.

    Input channels and output size come from the data and the task; ``width`` sets the
    channel count of the first layer of ``small_cnn``, ``unet`` (then doubled at each of
    its levels) and ``segresnet``. ``norm`` picks the normalization layers of ``small_cnn``
    and ``unet``: ``batch`` (default) or ``group`` (needed by sample-level DP-SGD, whose
    per-example gradients batch norm would mix; segresnet always uses group norm).
    """

    name: Literal["small_cnn", "densenet121", "resnet18", "resnet50", "unet", "segresnet"]
    width: Count = Field(16, ge=1, le=512)
    norm: Literal["batch", "group"] = "batch"


class TaskConfig(Frozen):
    """Classification. ``binary`` uses one logit; ``multiclass`` one logit per class with
    softmax; ``multilabel`` one independent logit per label. ``num_classes`` is the number
    of classes (2 for binary) or of labels. ``monitor`` picks the best model on val."""

    kind: Literal["classification"] = "classification"
    labels: Literal["binary", "multiclass", "multilabel"]
    num_classes: Count = Field(2, ge=2, le=1000)
    monitor: Literal["auc", "accuracy"] = "auc"

    @model_validator(mode="after")
    def _binary_has_two(self) -> "TaskConfig":
        if self.labels == "binary" and self.num_classes != 2:
            raise ValueError(f"num_classes must be 2 for binary labels, got {self.num_classes}")
        return self


class SegmentationTaskConfig(Frozen):
    """Segmentation, 2D or 3D: one softmax logit per class per pixel, class 0 the
    background. Loss: Dice + cross-entropy. Metrics: Dice per class and their mean over
    the foreground classes (``dice``), and on the test split the 95% Hausdorff distance
    (``hd95``, in mm when the data's spacing is known, else in pixels or voxels; costly,
    ``hd95: false`` turns it off).
    ``save_predictions``: how many predicted test masks per site to keep from the final
    federated model (PNG overlays shown in the report for 2D, NIfTI files for 3D)."""

    kind: Literal["segmentation"]
    num_classes: Count = Field(2, ge=2, le=255)
    monitor: Literal["dice"] = "dice"
    hd95: bool = True
    save_predictions: Count = Field(4, ge=0, le=1000)


def task_kind(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("kind", "classification")
    return getattr(v, "kind", "classification")


AnyTaskConfig = Annotated[
    Union[Annotated[TaskConfig, Tag("classification")], Annotated[SegmentationTaskConfig, Tag("segmentation")]],
    Discriminator(task_kind),
]
