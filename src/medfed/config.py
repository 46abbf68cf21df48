"""The job file: schema, loading and error messages.

A job is validated once, at load time, and frozen. An error names the field path and the
bad value, e.g. ``train.lr: must be > 0, got -1``. Relative data paths are resolved
against the job file's folder, so a job file and its data can move together; the output
folder is resolved against the current directory, where the user runs medfed.

Numbers are what they say: a count is a whole number (``true``, ``2.0`` or ``1.0e9`` is
refused), a real number is finite (``.inf`` and ``.nan`` are refused), and every count has
an upper bound, so a typo cannot make a run that never ends or never fits in memory:
``rounds`` <= 100 000, epochs <= :data:`MAX_EPOCHS`, ``batch_size`` <= :data:`MAX_BATCH`,
sites <= :data:`MAX_SITES`, examples per split of a synthetic site <= :data:`MAX_EXAMPLES`,
image and patch sides <= :data:`MAX_SIDE` (:data:`MAX_VOXELS` per image), and all the
generated (synthetic) images of a job <= :data:`SYNTHETIC_MAX_BYTES`. A YAML file whose
aliases expand to more than :data:`MAX_YAML_NODES` values is refused before it is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from medfed.core.errors import ConfigError
from medfed.core.schema import Count, Frozen, NoBool, Real
from medfed.privacy.settings import CompressionConfig, PrivacyConfig
from medfed.robust.settings import AttackConfig, RobustConfig

SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


# Upper bounds of the job's counts (see the module docstring).
MAX_SITES = 10_000  # sites of a data section
MAX_EXAMPLES = 1_000_000  # examples in one split of a synthetic site
MAX_EPOCHS = 1_000  # local_epochs, head_epochs, finetune_epochs
MAX_BATCH = 16_384  # batch_size
MAX_ROUNDS = 100_000  # rounds, eval_every
MAX_SIDE = 4_096  # one side of a crop, resize or patch size
MAX_VOXELS = 2**27  # pixels (voxels) of one image after crop/resize, or of a patch: 512**3
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0  # seconds: one week
SYNTHETIC_MAX_BYTES = 4 * 2**30  # generated images (float32) and masks (int64) of all sites
MAX_YAML_NODES = 1_000_000  # values of a YAML file once its aliases are expanded


RESERVED_SITE_NAMES = {"all", "median"}  # the mean and the median over sites in metrics and reports


def _unique(names: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for n in names:
        if what == "site names" and n in RESERVED_SITE_NAMES:
            raise ValueError(f"'{n}' is reserved and cannot name a site")
        if n in seen:
            raise ValueError(f"{what} must be unique, '{n}' appears twice")
        seen.add(n)
    return names


# --------------------------------------------------------------------------- data


class ScannerConfig(Frozen):
    """A site's acquisition signature, applied to images in [0, 1] before noise.

    ``out = intensity_scale * in**contrast + intensity_offset``, then a Gaussian blur of
    ``blur`` pixels (sigma), then a loss of ``resolution`` (the image is downsampled by
    this factor and brought back to its size: 0.5 halves the detail), and additive
    Gaussian noise of standard deviation ``noise``. The same signature can be put on real
    images with the job's ``feature_shift``.
    """

    intensity_scale: Real = Field(1.0, gt=0)
    intensity_offset: Real = 0.0
    contrast: Real = Field(1.0, gt=0)
    noise: Real = Field(0.0, ge=0)
    blur: Real = Field(0.0, ge=0)
    resolution: Real = Field(1.0, gt=0, le=1)


class SyntheticSite(Frozen):
    """One synthetic hospital: its size, label prevalence and scanner."""

    name: SiteName
    n_train: Count = Field(gt=0, le=MAX_EXAMPLES)
    n_val: Count = Field(20, gt=0, le=MAX_EXAMPLES)
    n_test: Count = Field(gt=0, le=MAX_EXAMPLES)
    prevalence: Real = Field(0.5, gt=0, lt=1)
    scanner: ScannerConfig = ScannerConfig()


class _SyntheticSites(Frozen):
    """The site list shared by the synthetic sources: names unique, in the job's order."""

    sites: list[SyntheticSite] = Field(min_length=1, max_length=MAX_SITES)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[SyntheticSite]) -> list[SyntheticSite]:
        _unique([s.name for s in v], "site names")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class SyntheticData(_SyntheticSites):
    """Generated 2D images, 1 channel: an anatomical background with or without a lesion.

    ``lesion_contrast`` is the lesion's intensity above the tissue around it (images in
    [0, 1] before the scanner signature): lower is harder.
    """

    source: Literal["synthetic"]
    image_size: Count = Field(32, ge=16, le=512)
    lesion_contrast: Real = Field(0.3, gt=0, le=1)


class PartitionConfig(Frozen):
    """How one data set is split into sites.

    ``iid``: uniformly at random, equal sizes. ``dirichlet``: label skew, each class is
    shared among sites in proportions drawn from Dirichlet(alpha); small alpha means strong
    skew. ``quantity``: site sizes drawn from Dirichlet(alpha), labels IID.
    The same per-site proportions are applied to the train, val and test splits, so a
    site's test set has the same population as its training set.
    """

    method: Literal["iid", "dirichlet", "quantity"]
    sites: list[SiteName] = Field(min_length=1, max_length=MAX_SITES)
    alpha: Real = Field(0.5, gt=0)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[str]) -> list[str]:
        return _unique(v, "site names")


class MedMNISTData(Frozen):
    """A MedMNIST ``.npz`` file with its official train/val/test split, split into sites.
    ``dims: 2`` for the 2D sets (images (N, H, W) or (N, H, W, 3)), ``dims: 3`` for the 3D
    sets such as OrganMNIST3D (volumes (N, D, H, W))."""

    source: Literal["medmnist"]
    path: Path
    dims: Annotated[Literal[2, 3], NoBool] = 2
    partition: PartitionConfig

    @property
    def site_names(self) -> list[str]:
        return list(self.partition.sites)


class SplitConfig(Frozen):
    """Fractions of a site's examples held out for ``val`` and ``test`` when its files do
    not say which split they belong to. Drawn with the job seed; the rest trains."""

    val: Real = Field(0.15, gt=0, lt=1)
    test: Real = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training(self) -> "SplitConfig":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave examples to train on, got {self.val:g} + {self.test:g}")
        return self


class FileSet(Frozen):
    """Files of one site or one split: an ``images`` folder, and the ``masks`` folder (image
    and mask matched by file name) or the ``csv`` of labels that goes with it."""

    images: Path
    masks: Path | None = None
    csv: Path | None = None


class FileSite(Frozen):
    """One site's files: ``images`` (with ``masks`` or ``csv``) holding all its examples,
    or ``train`` with optional ``val`` and ``test`` sets (missing ones are drawn from
    ``train`` by the data's ``split`` fractions)."""

    name: SiteName
    images: Path | None = None
    masks: Path | None = None
    csv: Path | None = None
    train: FileSet | None = None
    val: FileSet | None = None
    test: FileSet | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> "FileSite":
        flat = self.images is not None
        split = self.train is not None
        if flat == split:
            raise ValueError(f"site '{self.name}': give either images (all examples) or train (with optional val, test)")
        if split and (self.masks is not None or self.csv is not None):
            raise ValueError(f"site '{self.name}': masks and csv go inside train/val/test when those are given")
        if not split and (self.val is not None or self.test is not None):
            raise ValueError(f"site '{self.name}': val and test need train")
        return self

    def file_sets(self) -> dict[str, FileSet]:
        """The declared sets by split; ``all`` when the site gives one undivided set."""
        if self.images is not None:
            return {"all": FileSet(images=self.images, masks=self.masks, csv=self.csv)}
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}


def _split_label(split: str) -> str:
    return "" if split == "all" else f" {split}"


def _site_list(v: list[FileSite]) -> list[FileSite]:
    _unique([s.name for s in v], "site names")
    return v


class SitesBy(Frozen):
    """A natural split: the value of ``column`` in the CSV names each row's site; ``sites``
    lists the values that are sites (a row with another value is an error)."""

    column: str = Field(min_length=1)
    sites: list[SiteName] = Field(min_length=1, max_length=MAX_SITES)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[str]) -> list[str]:
        return _unique(v, "site names")


OnBadFile = Literal["error", "skip"]


class FolderData(Frozen):
    """Image files (PNG, JPEG, TIFF) with a CSV of labels, for classification.

    The CSV has a ``file_column`` (path relative to the images folder) and the
    ``label_columns``: one column of class indices (binary, multi-class) or one 0/1 column
    per label (multi-label); other columns are metadata. A ``split_column`` with values
    train/val/test fixes each row's split; without one, ``split`` fractions are drawn.

    Sites: each site its own folder and CSV (``sites``), or one folder and CSV split by a
    metadata column (``sites_by``, the natural split) or by a ``partition``.
    ``channels``: 1 reads grey, 3 reads RGB. ``on_bad_file: skip`` leaves out unreadable
    files and reports them by name, per site.
    """

    source: Literal["folder"]
    images: Path | None = None
    csv: Path | None = None
    sites: list[FileSite] | None = Field(None, min_length=1, max_length=MAX_SITES)
    sites_by: SitesBy | None = None
    partition: PartitionConfig | None = None
    file_column: str = Field("file", min_length=1)
    label_columns: list[str] = Field(min_length=1)
    split_column: str | None = None
    split: SplitConfig = SplitConfig()
    channels: Annotated[Literal[1, 3], NoBool] = 1
    on_bad_file: OnBadFile = "error"

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[FileSite] | None) -> list[FileSite] | None:
        return None if v is None else _site_list(v)

    @model_validator(mode="after")
    def _one_way(self) -> "FolderData":
        ways = [w for w in ("sites", "sites_by", "partition") if getattr(self, w) is not None]
        if len(ways) != 1:
            raise ValueError(f"give exactly one of sites, sites_by or partition, got {ways or 'none'}")
        shared = self.images is not None and self.csv is not None
        if ways[0] == "sites":
            if self.images is not None or self.csv is not None:
                raise ValueError("with sites, each site names its own images and csv")
            for s in self.sites or []:
                for split, fs in s.file_sets().items():
                    if fs.csv is None:
                        raise ValueError(f"site '{s.name}'{_split_label(split)}: a folder of images needs its csv of labels")
        elif not shared:
            raise ValueError(f"{ways[0]} splits one data set: give its images folder and csv")
        return self

    @property
    def site_names(self) -> list[str]:
        if self.sites is not None:
            return [s.name for s in self.sites]
        if self.sites_by is not None:
            return list(self.sites_by.sites)
        return list(self.partition.sites)  # type: ignore[union-attr]


class PairsData(Frozen):
    """2D segmentation: image and mask files (PNG, JPEG, TIFF, BMP) matched by file name,
    each site with its own folders. Masks store grey levels; ``mask_values`` lists them in
    class order (e.g. ``[0, 255]``, or ``[0, 128, 255]`` for fundus disc and cup) and
    they become classes 0..K-1. An image without its mask, or the reverse, is an error
    naming the file."""

    source: Literal["pairs"]
    sites: list[FileSite] = Field(min_length=1, max_length=MAX_SITES)
    mask_values: list[Annotated[Count, Field(ge=0, le=65_535)]] = Field(min_length=2, max_length=256)
    channels: Annotated[Literal[1, 3], NoBool] = 1
    split: SplitConfig = SplitConfig()
    on_bad_file: OnBadFile = "error"

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[FileSite]) -> list[FileSite]:
        _site_list(v)
        for s in v:
            for split, fs in s.file_sets().items():
                if fs.masks is None:
                    raise ValueError(f"site '{s.name}'{_split_label(split)}: image/mask pairs need a masks folder")
        return v

    @field_validator("mask_values")
    @classmethod
    def _values_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"mask values must be distinct, got {v}")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class VolumesData(Frozen):
    """3D segmentation: image volumes and label volumes matched by name. ``format: nifti``
    reads ``.nii``/``.nii.gz`` files; ``format: dicom`` reads each sub-folder of the images
    folder as one series (or each file as a multi-frame volume). Masks are NIfTI label
    volumes named after the image (file stem or series folder name), holding class indices.
    Spacing is kept; resample with a ``spacing`` preprocessing step."""

    source: Literal["volumes"]
    format: Literal["nifti", "dicom"] = "nifti"
    sites: list[FileSite] = Field(min_length=1, max_length=MAX_SITES)
    split: SplitConfig = SplitConfig()
    on_bad_file: OnBadFile = "error"

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[FileSite]) -> list[FileSite]:
        _site_list(v)
        for s in v:
            for split, fs in s.file_sets().items():
                if fs.masks is None:
                    raise ValueError(f"site '{s.name}'{_split_label(split)}: volumes need a masks folder of label volumes")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class SyntheticSegmentationData(_SyntheticSites):
    """Generated segmentation data, 2D or 3D, 1 channel: a body with an organ (class 1)
    and, in a ``prevalence`` share of images, a lesion inside the organ (class 2 when the
    task has 3 classes, else part of the organ class), under each site's scanner signature.
    """

    source: Literal["synthetic_segmentation"]
    dims: Annotated[Literal[2, 3], NoBool] = 2
    image_size: Count = Field(48, ge=16, le=256)
    lesion_contrast: Real = Field(0.3, gt=0, le=1)


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def synthetic_size_problem(data: Any) -> str | None:
    """Why the generated data of a ``synthetic`` or ``synthetic_segmentation`` section
    would not fit in memory, naming the largest split's field; None when it fits (or the
    source is not generated).

    Generated data is held whole: N examples of C x S**d pixels take N * C * S**d * 4 bytes
    (float32), plus 8 bytes a pixel for segmentation masks (int64), over every split of
    every site; at most :data:`SYNTHETIC_MAX_BYTES`. Rendering a split briefly needs a few
    times that split's size on top."""
    if isinstance(data, SyntheticData):
        shape, per_pixel = (1, data.image_size, data.image_size), 4
    elif isinstance(data, SyntheticSegmentationData):
        shape, per_pixel = (1,) + (data.image_size,) * data.dims, 4 + 8
    else:
        return None
    per_example = math.prod(shape) * per_pixel
    total = sum((s.n_train + s.n_val + s.n_test) * per_example for s in data.sites)
    if total <= SYNTHETIC_MAX_BYTES:
        return None
    i, field = max(((i, f) for i in range(len(data.sites)) for f in ("n_train", "n_val", "n_test")),
                   key=lambda x: getattr(data.sites[x[0]], x[1]))
    n = getattr(data.sites[i], field)
    what = "images and masks" if per_pixel > 4 else "images"
    return (
        f"data.sites[{i}].{field}: {n:,} examples of {'x'.join(map(str, shape))} pixels; the generated {what} of "
        f"all sites and splits would need {_size_text(total)} of memory, more than the {_size_text(SYNTHETIC_MAX_BYTES)} "
        "synthetic data may take. Lower the sites' n_train, n_val, n_test or data.image_size"
    )


DataConfig = Annotated[
    Union[SyntheticData, MedMNISTData, FolderData, PairsData, VolumesData, SyntheticSegmentationData],
    Field(discriminator="source"),
]

SEGMENTATION_SOURCES = ("pairs", "volumes", "synthetic_segmentation")


# --------------------------------------------------------------------------- transforms

# Intensity windows (level +- width / 2) in Hounsfield units, for CT.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct_abdomen": (-160.0, 240.0),   # level 40, width 400
    "ct_liver": (-25.0, 175.0),      # level 75, width 200
    "ct_lung": (-1350.0, 150.0),     # level -600, width 1500
    "ct_mediastinum": (-125.0, 225.0),  # level 50, width 350
    "ct_brain": (0.0, 80.0),         # level 40, width 80
    "ct_bone": (-450.0, 1050.0),     # level 300, width 1500
}


def _fits_voxels(size: list[int]) -> list[int]:
    if math.prod(size) > MAX_VOXELS:
        raise ValueError(f"{size} is {math.prod(size):,} pixels; an image may have at most {MAX_VOXELS:,}")
    return size


# An image or patch size, 2 or 3 sides, each 1..MAX_SIDE pixels, MAX_VOXELS in all.
ImageSize = Annotated[
    list[Annotated[Count, Field(ge=1, le=MAX_SIDE)]], Field(min_length=2, max_length=3), AfterValidator(_fits_voxels)
]


class WindowStep(Frozen):
    """Clip intensities to [``min``, ``max``] (or a CT ``preset``) and scale them to [0, 1]."""

    name: Literal["window"]
    min: Real | None = None
    max: Real | None = None
    preset: Literal["ct_abdomen", "ct_liver", "ct_lung", "ct_mediastinum", "ct_brain", "ct_bone"] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "WindowStep":
        if (self.preset is None) == (self.min is None or self.max is None):
            if self.preset is None:
                raise ValueError("window: give min and max, or a preset")
            raise ValueError("window: give a preset or min and max, not both")
        if self.preset is None and self.max <= self.min:  # type: ignore[operator]
            raise ValueError(f"window: max must be > min, got min {self.min:g}, max {self.max:g}")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        return WINDOW_PRESETS[self.preset] if self.preset is not None else (self.min, self.max)  # type: ignore[return-value]


class NormalizeStep(Frozen):
    """``zscore``: zero mean, unit variance per image (over ``nonzero`` voxels only if set);
    ``minmax``: scaled to [0, 1] per image."""

    name: Literal["normalize"]
    mode: Literal["zscore", "minmax"] = "zscore"
    nonzero: bool = False


class SpacingStep(Frozen):
    """Resample volumes to ``pixdim`` millimetres per voxel (image trilinear, mask nearest)."""

    name: Literal["spacing"]
    pixdim: list[Real] = Field(min_length=2, max_length=3)

    @field_validator("pixdim")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not (x > 0) for x in v):
            raise ValueError(f"must be > 0, got {v}")
        return v


class CropOrPadStep(Frozen):
    """Centre-crop or zero-pad every image (and mask) to ``size``."""

    name: Literal["crop_or_pad"]
    size: ImageSize


class ResizeStep(Frozen):
    """Resize every image to ``size`` (image bilinear/trilinear, mask nearest)."""

    name: Literal["resize"]
    size: ImageSize


PreprocessStep = Annotated[
    Union[WindowStep, NormalizeStep, SpacingStep, CropOrPadStep, ResizeStep], Field(discriminator="name")
]


class FlipStep(Frozen):
    """Flip along each spatial axis in ``axes`` (0 = first spatial axis) with chance ``prob``."""

    name: Literal["flip"]
    axes: list[Annotated[Count, Field(ge=0, le=2)]] = Field(default_factory=lambda: [0], min_length=1, max_length=3)
    prob: Real = Field(0.5, ge=0, le=1)


class Rotate90Step(Frozen):
    """Rotate by a random multiple of 90 degrees in the plane of the last two axes."""

    name: Literal["rotate90"]
    prob: Real = Field(0.5, ge=0, le=1)


class RotateStep(Frozen):
    """Rotate by an angle drawn in [-``degrees``, ``degrees``] (in-plane for 2D, about each
    axis for 3D)."""

    name: Literal["rotate"]
    degrees: Real = Field(15.0, gt=0, le=180)
    prob: Real = Field(0.5, ge=0, le=1)


class ZoomStep(Frozen):
    """Zoom by a factor drawn in [``min``, ``max``], keeping the image size."""

    name: Literal["zoom"]
    min: Real = Field(0.9, gt=0)
    max: Real = Field(1.1, gt=0)
    prob: Real = Field(0.5, ge=0, le=1)


class IntensityStep(Frozen):
    """Intensity jitter: multiply by ``1 + u``, u in [-``scale``, ``scale``], then add a
    shift drawn in [-``shift``, ``shift``]."""

    name: Literal["intensity"]
    scale: Real = Field(0.1, ge=0)
    shift: Real = Field(0.1, ge=0)
    prob: Real = Field(0.5, ge=0, le=1)


class NoiseStep(Frozen):
    """Additive Gaussian noise of standard deviation up to ``std``."""

    name: Literal["noise"]
    std: Real = Field(0.05, gt=0)
    prob: Real = Field(0.3, ge=0, le=1)


class ContrastStep(Frozen):
    """Gamma contrast change with gamma drawn in [``min``, ``max``]."""

    name: Literal["contrast"]
    min: Real = Field(0.7, gt=0)
    max: Real = Field(1.5, gt=0)
    prob: Real = Field(0.3, ge=0, le=1)


AugmentStep = Annotated[
    Union[FlipStep, Rotate90Step, RotateStep, ZoomStep, IntensityStep, NoiseStep, ContrastStep],
    Field(discriminator="name"),
]


class TransformsConfig(Frozen):
    """Preprocessing (applied once to every image when the data is read, in order) and
    augmentation (applied to every training batch, random, seeded by the round), both
    built from MONAI transforms. ``patch``: train on random crops of this size; evaluation
    then runs sliding-window inference over the whole image or volume."""

    preprocess: list[PreprocessStep] = Field(default_factory=list)
    augment: list[AugmentStep] = Field(default_factory=list)
    patch: ImageSize | None = None

    @field_validator("patch")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(x < 4 for x in v):
            raise ValueError(f"patch sizes must be >= 4, got {v}")
        return v


# --------------------------------------------------------------------------- model, task, training


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


def _task_kind(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("kind", "classification")
    return getattr(v, "kind", "classification")


AnyTaskConfig = Annotated[
    Union[Annotated[TaskConfig, Tag("classification")], Annotated[SegmentationTaskConfig, Tag("segmentation")]],
    Discriminator(_task_kind),
]


class TrainConfig(Frozen):
    """The local training step, the same at every site and for the baselines."""

    local_epochs: Count = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: Count = Field(32, ge=1, le=MAX_BATCH)
    lr: Real = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Real = Field(0.9, ge=0, lt=1)
    weight_decay: Real = Field(0.0, ge=0)


class FedAvgConfig(Frozen):
    """FedAvg (McMahan et al., 2017): the average of site parameters weighted by the number
    of training examples."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(Frozen):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term ``mu/2 ||w - w_global||^2``
    in each site's local loss. ``mu = 0`` is FedAvg."""

    name: Literal["fedprox"]
    mu: Real = Field(0.01, ge=0)


class FedOptConfig(Frozen):
    """Server optimizers on the pseudo-gradient (Reddi et al., 2021; Hsu et al., 2019).

    The pseudo-gradient is the example-weighted mean of the site parameters minus the
    global parameters. ``fedavgm``: heavy-ball momentum ``beta1`` (``beta1 = 0`` and
    ``server_lr = 1`` is FedAvg). ``fedadagrad``, ``fedadam``, ``fedyogi``: adaptive
    steps with first-moment decay ``beta1``, second-moment decay ``beta2`` and
    adaptivity ``tau``. Only trainable parameters take the optimizer step; buffers such
    as batch-norm statistics take the plain weighted mean.
    """

    name: Literal["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
    server_lr: Real = Field(1.0, gt=0)
    beta1: Real = Field(0.9, ge=0, lt=1)
    beta2: Real = Field(0.99, ge=0, lt=1)
    tau: Real = Field(1e-3, gt=0)


class ScaffoldConfig(Frozen):
    """SCAFFOLD (Karimireddy et al., 2020), control variates of option II: site gradients
    are corrected by ``c - c_i``; ``server_lr`` scales the averaged model update. Needs
    plain SGD local steps (``train.momentum: 0``): option II estimates the mean gradient as
    ``(x - y) / (K * lr)``, which momentum inflates."""

    name: Literal["scaffold"]
    server_lr: Real = Field(1.0, gt=0)


class FedBNConfig(Frozen):
    """FedBN (Li et al., ICLR 2021): batch-norm layers (weights, biases and running
    statistics) stay at each site, are never sent and never overwritten; the other layers
    are averaged as in FedAvg. Each site evaluates with its own batch-norm layers."""

    name: Literal["fedbn"]


class FedNovaConfig(Frozen):
    """FedNova (Wang et al., 2020): each site's change is divided by its number of local
    steps (corrected for momentum) before averaging, so sites that take more steps do not
    pull the global model further. With equal steps everywhere it is FedAvg."""

    name: Literal["fednova"]


class FedDynConfig(Frozen):
    """FedDyn (Acar et al., 2021): dynamic regularization. Each site adds
    ``-<g_i, w> + alpha/2 ||w - w_global||^2`` to its loss and updates its ``g_i``; the
    server keeps a correction ``h``. ``alpha`` > 0."""

    name: Literal["feddyn"]
    alpha: Real = Field(0.01, gt=0)


class DittoConfig(Frozen):
    """Ditto (Li et al., ICML 2021): FedAvg for the global model plus a personal model at
    each site, trained with a proximal pull of weight ``lam`` towards the global model and
    reported as the ``personalized`` arm."""

    name: Literal["ditto"]
    lam: Real = Field(0.1, ge=0)


class FedRepConfig(Frozen):
    """FedRep (Collins et al., 2021): ``personal_layers`` stay at each site like FedPer;
    each round trains the head alone for ``head_epochs`` epochs, then the body alone for
    ``train.local_epochs`` epochs."""

    name: Literal["fedrep"]
    personal_layers: list[str] = Field(min_length=1)
    head_epochs: Count = Field(1, ge=1, le=MAX_EPOCHS)


class MoonConfig(Frozen):
    """MOON (Li, He and Song, 2021): a model-contrastive term of weight ``mu`` and
    temperature ``tau`` on the representation entering the classifier head."""

    name: Literal["moon"]
    mu: Real = Field(1.0, ge=0)
    tau: Real = Field(0.5, gt=0)


class FedPerConfig(Frozen):
    """FedPer (Arivazhagan et al., 2019): the layers in ``personal_layers`` (module names
    of the model, e.g. ``head`` for small_cnn, ``fc`` for the MONAI ResNets,
    ``class_layers`` for DenseNet121) stay personal at each site; the rest is averaged."""

    name: Literal["fedper"]
    personal_layers: list[str] = Field(min_length=1)


# One entry per algorithm; each is `name: Literal[...]` plus its hyperparameters.
AlgorithmConfig = Annotated[
    Union[
        FedAvgConfig, FedProxConfig, FedOptConfig, ScaffoldConfig, FedBNConfig, FedNovaConfig, FedDynConfig,
        FedPerConfig, FedRepConfig, DittoConfig, MoonConfig,
    ],
    Field(discriminator="name"),
]


# Algorithms whose server rule uses the updates only through their (weighted) mean: they
# take a robust rule, site-level DP or secure aggregation in place of that mean.
MEAN_ALGORITHMS = frozenset(
    {"fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedbn", "fedper", "fedrep", "ditto", "moon"}
)
_BEYOND_MEAN = {
    "scaffold": "also sends control variates",
    "feddyn": "keeps a server correction built from each update",
    "fednova": "rescales each site's update by its own step count",
}
# Algorithms that change the local gradients beyond the task loss (DP-SGD cannot bound them).
EXTRA_LOSS_ALGORITHMS = {
    "fedprox": "adds a proximal loss term",
    "moon": "adds a contrastive loss term",
    "feddyn": "adds a dynamic regularizer",
    "ditto": "trains a personal model with a proximal term",
    "scaffold": "corrects the gradients with control variates",
}


class SamplingConfig(Frozen):
    """Which sites train in a round. Give ``fraction`` of the sites (rounded up) or a
    ``count``, never both; at least ``minimum`` are drawn. ``uniform`` draws every site
    with equal chance; ``size`` with chance proportional to its training examples. The
    draw is repeatable: it depends only on the job seed and the round."""

    fraction: Real | None = Field(None, gt=0, le=1)
    count: Count | None = Field(None, ge=1, le=MAX_SITES)
    minimum: Count = Field(1, ge=1, le=MAX_SITES)
    method: Literal["uniform", "size"] = "uniform"

    @model_validator(mode="after")
    def _one_of(self) -> "SamplingConfig":
        if self.fraction is not None and self.count is not None:
            raise ValueError("give either fraction or count, not both")
        return self


# --------------------------------------------------------------------------- the job


class Job(Frozen):
    """A whole federated run: who takes part, on what data, with which model and method.

    ``compare`` adds arms trained on the same data: ``local`` (each site alone),
    ``centralized`` (all data pooled) and ``finetuned`` (the final federated model
    fine-tuned at each site for ``finetune_epochs`` epochs on its own training data).

    ``feature_shift`` puts a scanner signature on a site's images after they are read
    (heterogeneity on real data). ``held_out`` sites never train, in any arm: they are
    evaluated with the models the other sites trained (domain generalization).
    """

    name: Annotated[str, Field(min_length=1, max_length=128)]
    seed: Count = Field(0, ge=0, lt=2**31)
    output: Path
    rounds: Count = Field(ge=1, le=MAX_ROUNDS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Count | None = Field(None, ge=1, le=512)
    transport: Literal["inprocess", "pool"] = "inprocess"
    workers: Count | None = Field(None, ge=1, le=256)
    round_timeout: Real = Field(600.0, gt=0, le=MAX_ROUND_TIMEOUT)
    min_sites: Count | None = Field(None, ge=1, le=MAX_SITES)
    sampling: SamplingConfig = SamplingConfig()
    eval_every: Count = Field(1, ge=1, le=MAX_ROUNDS)
    data: DataConfig
    transforms: TransformsConfig = TransformsConfig()
    feature_shift: dict[SiteName, ScannerConfig] = Field(default_factory=dict)
    held_out: list[SiteName] = Field(default_factory=list)
    model: ModelConfig
    task: AnyTaskConfig
    algorithm: AlgorithmConfig = FedAvgConfig()
    train: TrainConfig = TrainConfig()
    compare: list[Literal["local", "centralized", "finetuned"]] = Field(default_factory=list)
    finetune_epochs: Count = Field(1, ge=1, le=MAX_EPOCHS)
    privacy: PrivacyConfig = PrivacyConfig()
    compression: CompressionConfig | None = None
    robust: RobustConfig | None = None
    attack: AttackConfig | None = None

    @field_validator("compare")
    @classmethod
    def _compare_unique(cls, v: list[str]) -> list[str]:
        return _unique(v, "compare entries")

    @model_validator(mode="after")
    def _quorum_fits(self) -> "Job":
        n = len(self.site_names) - len(self.held_out)
        if self.min_sites is not None and self.min_sites > self.sites_per_round:
            raise ValueError(
                f"min_sites: is {self.min_sites} but only {self.sites_per_round} of the {n} sites train in a round"
            )
        if isinstance(self.algorithm, ScaffoldConfig) and (self.train.optimizer != "sgd" or self.train.momentum != 0):
            raise ValueError(
                "train.momentum: scaffold's control variates assume plain SGD local steps; "
                f"set train.optimizer: sgd and train.momentum: 0 (got {self.train.optimizer}, momentum {self.train.momentum:g})"
            )
        if isinstance(self.algorithm, FedNovaConfig) and self.train.optimizer != "sgd":
            raise ValueError(
                "train.optimizer: fednova normalizes by the number of SGD steps; "
                f"set train.optimizer: sgd (got {self.train.optimizer})"
            )
        problem = synthetic_size_problem(self.data)
        if problem is not None:
            raise ValueError(problem)
        self._check_task_fits()
        self._check_site_refs()
        self._check_update_path()
        if self.sampling.count is not None and self.sampling.count > n:
            raise ValueError(f"sampling.count: is {self.sampling.count} but the job has only {n} training sites")
        if self.sampling.minimum > n:
            raise ValueError(f"sampling.minimum: is {self.sampling.minimum} but the job has only {n} training sites")
        return self

    def _check_task_fits(self) -> None:
        seg_task = self.task.kind == "segmentation"
        seg_data = self.data.source in SEGMENTATION_SOURCES
        if seg_data != seg_task:
            want = "task.kind: segmentation" if seg_data else "a classification task"
            raise ValueError(f"data.source: '{self.data.source}' data needs {want}, got task.kind '{self.task.kind}'")
        if seg_task and self.model.name not in SEGMENTERS:
            raise ValueError(f"model.name: a segmentation task needs one of {list(SEGMENTERS)}, got '{self.model.name}'")
        if not seg_task and self.model.name not in CLASSIFIERS:
            raise ValueError(
                f"model.name: '{self.model.name}' segments; a classification task needs one of {list(CLASSIFIERS)}"
            )
        if isinstance(self.data, PairsData) and len(self.data.mask_values) != self.task.num_classes:
            raise ValueError(
                f"data.mask_values: {len(self.data.mask_values)} values {self.data.mask_values} but "
                f"task.num_classes is {self.task.num_classes}; give one grey level per class"
            )
        if isinstance(self.data, SyntheticSegmentationData) and self.task.num_classes not in (2, 3):
            raise ValueError(
                "task.num_classes: synthetic segmentation has 2 classes (background, organ) or 3 "
                f"(background, organ, lesion), got {self.task.num_classes}"
            )
        dims = self.data_dims
        for i, step in enumerate(self.transforms.preprocess):
            size = getattr(step, "size", None) or getattr(step, "pixdim", None)
            if size is not None and dims is not None and len(size) != dims:
                raise ValueError(f"transforms.preprocess[{i}]: {step.name} needs {dims} sizes for {dims}D data, got {list(size)}")
        patch = self.transforms.patch
        if patch is not None and dims is not None and len(patch) != dims:
            raise ValueError(f"transforms.patch: needs {dims} sizes for {dims}D data, got {patch}")
        if patch is not None and not seg_task:
            raise ValueError("transforms.patch: patch training is for segmentation tasks")

    def _check_site_refs(self) -> None:
        names = set(self.site_names)
        for field, refs in (("feature_shift", list(self.feature_shift)), ("held_out", self.held_out)):
            unknown = [r for r in refs if r not in names]
            if unknown:
                raise ValueError(f"{field}: unknown site(s) {unknown}; the sites are {self.site_names}")
        _unique(self.held_out, "held_out entries")
        if len(self.held_out) >= len(self.site_names):
            raise ValueError(f"held_out: at least one site must train, but all of {self.site_names} are held out")

    def _check_update_path(self) -> None:
        """Refuse privacy, robustness and compression settings that do not fit together:
        each would otherwise weaken a guarantee without saying so."""
        algo, p, k = self.algorithm.name, self.privacy, self.sites_per_round
        if p.dp is not None:
            if algo not in MEAN_ALGORITHMS:
                raise ValueError(
                    f"algorithm.name: site-level DP bounds each site's share of the mean of the updates; "
                    f"'{algo}' {_BEYOND_MEAN[algo]}, so its privacy cost is not accounted for. "
                    f"Use one of {sorted(MEAN_ALGORITHMS)}"
                )
            if self.sampling.method != "uniform":
                raise ValueError("sampling.method: DP accounting assumes every site is equally likely to be drawn; use uniform")
            if p.dp.noise == "central" and self.robust is not None:
                raise ValueError("robust: central DP noise and a robust rule both replace the mean; choose one")
            if self.has_batch_norm and algo != "fedbn":
                raise ValueError(
                    f"model.norm: site-level DP adds noise to every entry the sites share, batch-norm running "
                    f"variances included, which it can drive below zero; use small_cnn or unet with norm: group, "
                    f"segresnet, or algorithm fedbn (batch-norm layers stay at each site); got {self.model.name} "
                    f"with batch norm"
                )
        if p.dp_sgd is not None:
            if algo in EXTRA_LOSS_ALGORITHMS:
                raise ValueError(
                    f"algorithm.name: '{algo}' {EXTRA_LOSS_ALGORITHMS[algo]} outside the per-example gradients that "
                    "DP-SGD clips and noises, so its privacy cost is not accounted for; use fedavg, a server optimizer, "
                    "fednova, fedper or fedrep"
                )
            if self.task.kind != "classification":
                raise ValueError(
                    "task.kind: DP-SGD bounds each example's gradient, but the segmentation loss (Dice over the "
                    "batch) mixes examples; DP-SGD is for classification tasks"
                )
            if not (self.model.name == "small_cnn" and self.model.norm == "group"):
                raise ValueError(
                    f"model.norm: DP-SGD needs per-example gradients, which batch norm mixes; use small_cnn with "
                    f"norm: group (got {self.model.name} with {self.model.norm} norm)"
                )
        sa = p.secure_aggregation
        if sa is not None:
            if algo not in MEAN_ALGORITHMS:
                raise ValueError(
                    f"algorithm.name: secure aggregation reveals only the sum of the updates; '{algo}' "
                    f"{_BEYOND_MEAN[algo]}. Use one of {sorted(MEAN_ALGORITHMS)}"
                )
            if self.robust is not None:
                raise ValueError("robust: a robust rule needs each site's update, which secure aggregation hides")
            if self.compression is not None:
                raise ValueError("compression: secure aggregation sends updates in its own ring encoding; remove compression")
            if p.dp is not None and p.dp.adaptive is not None:
                raise ValueError("privacy.dp.adaptive: adaptive clipping needs each site's norm, which secure aggregation hides")
            if k < 2:
                raise ValueError(f"privacy.secure_aggregation: needs at least 2 sites per round, the job has {k}")
            t = self.secagg_threshold
            if t > k:
                raise ValueError(f"privacy.secure_aggregation.threshold: is {t} but only {k} sites train in a round")
            if self.min_sites is not None and self.min_sites < t:
                raise ValueError(
                    f"min_sites: is {self.min_sites} but secure aggregation needs at least its threshold ({t}) "
                    "of survivors; raise min_sites or lower privacy.secure_aggregation.threshold"
                )
        r = self.robust
        if r is not None:
            if algo not in MEAN_ALGORITHMS:
                raise ValueError(f"robust: replaces the weighted mean, but '{algo}' {_BEYOND_MEAN[algo]}")
            if r.f is not None and k < 2 * r.f + 3:
                raise ValueError(f"robust.f: {r.rule} with f={r.f} needs at least {2 * r.f + 3} sites per round, the job has {k}")
            if r.select is not None and r.select > k:
                raise ValueError(f"robust.select: is {r.select} but only {k} sites train in a round")
        if self.attack is not None and self.attack.kind == "label_flip" and self.task.kind != "classification":
            raise ValueError("attack.kind: label_flip is for classification tasks")

    @property
    def has_batch_norm(self) -> bool:
        """True when the job's network has batch-norm layers."""
        m = self.model
        return m.name in ("densenet121", "resnet18", "resnet50") or (m.name in ("small_cnn", "unet") and m.norm == "batch")

    @property
    def secagg_threshold(self) -> int:
        """Secure aggregation's threshold: as set, or a majority of the round's sites."""
        sa = self.privacy.secure_aggregation
        if sa is not None and sa.threshold is not None:
            return sa.threshold
        return self.sites_per_round // 2 + 1

    @property
    def data_dims(self) -> int | None:
        """2 or 3 spatial dimensions when the data source fixes it, else None."""
        if isinstance(self.data, (MedMNISTData, SyntheticSegmentationData)):
            return self.data.dims
        if isinstance(self.data, VolumesData):
            return 3
        return 2

    @property
    def training_sites(self) -> list[str]:
        """The sites that train: all but the held-out ones, in the job's order."""
        return [s for s in self.site_names if s not in self.held_out]

    @property
    def sites_per_round(self) -> int:
        """How many sites are drawn each round (all training sites unless sampling says
        otherwise)."""
        n, s = len(self.training_sites), self.sampling
        k = s.count if s.count is not None else (math.ceil(s.fraction * n) if s.fraction is not None else n)
        return min(n, max(k, s.minimum))

    @property
    def site_names(self) -> list[str]:
        return self.data.site_names

    @property
    def num_threads(self) -> int:
        return self.threads if self.threads is not None else (os.cpu_count() or 1)

    @property
    def quorum(self) -> int:
        """Updates a round needs: ``min_sites``, or every site drawn for the round."""
        return self.min_sites if self.min_sites is not None else self.sites_per_round

    def job_hash(self) -> str:
        """SHA-256 of everything that affects results (the output folder does not)."""
        body = self.model_dump(mode="json", exclude={"output"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading and messages

_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "string_pattern_mismatch": "must match {pattern}",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "too_long": "must have at most {max_length} item(s)",
}


def _union_tags(union: Any, field: str) -> set[str]:
    """The discriminator values of an ``Annotated[Union[...], Field(discriminator=...)]``."""
    members = get_args(get_args(union)[0])
    return {tag for m in members for tag in get_args(m.model_fields[field].annotation)}


# The tags pydantic puts in error locations of the unions; derived, so a new algorithm,
# data source or transform never needs listing here.
_UNION_TAGS = (
    _union_tags(DataConfig, "source") | _union_tags(AlgorithmConfig, "name") | _union_tags(PreprocessStep, "name")
    | _union_tags(AugmentStep, "name") | {"classification", "segmentation"}
)
_UNION_PARENTS = ("data", "algorithm", "task", "]")


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts and parts[-1].lstrip(".").endswith(_UNION_PARENTS) and item in _UNION_TAGS:
            continue  # pydantic adds the union tag; users never write it
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(job)"


def _num(v: Any) -> Any:
    return f"{v:g}" if isinstance(v, float) else v


_RELATIVE_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*: ")
# fields that nested checks of the update-path sections name at the start of their message
_NESTED_CHECKED = {
    f for m in (PrivacyConfig, CompressionConfig, RobustConfig) for f in m.model_fields
} | {"adaptive"}


def _describe(err: dict[str, Any]) -> str:
    path = _field_path(tuple(err["loc"]))
    etype = err["type"]
    ctx = err.get("ctx", {}) or {}
    if etype == "literal_error":
        msg = f"must be one of {ctx.get('expected', '')}"
        if path.endswith("name") and path.split(".")[0] in ("model", "algorithm"):
            msg = f"unknown {path.split('.')[0]} name; {msg}"
    elif etype in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'")
        key = "kind" if key == f"{_task_kind.__name__}()" else key
        what = {"source": "data source", "name": f"{path} name", "kind": "task kind"}.get(key, key)
        if etype == "union_tag_not_found":
            return f"{path}.{key}: is required"
        return f"{path}.{key}: unknown {what} {ctx.get('tag')!r}; must be one of {ctx.get('expected_tags', '')}"
    elif etype == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if not err["loc"]:  # a check across fields: its message starts with the field path
            return msg
        head = msg.split(":", 1)[0].split(".")[0]
        if _RELATIVE_PATH.match(msg) and head in _NESTED_CHECKED:  # a nested check naming its own field
            return f"{path}.{msg}"
    elif etype in _MESSAGES:
        try:
            msg = _MESSAGES[etype].format(**{k: _num(v) for k, v in ctx.items()})
        except KeyError:
            msg = err["msg"]
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
    if etype not in ("missing", "value_error", "union_tag_not_found") and "input" in err:
        got = err["input"]
        msg += f", got {got!r}" if not isinstance(got, dict) else ""
    return f"{path}: {msg}"


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [_describe(err) for err in e.errors()]
    return f"{source}: invalid job\n  " + "\n  ".join(lines)


def parse_job(raw: Any, source: str = "job", base_dir: Path | None = None) -> Job:
    """Validate a mapping (parsed YAML) as a Job. Relative data paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job must be a mapping of fields, got {type(raw).__name__}")
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    if base_dir is not None:
        job = job.model_copy(update={"data": _resolve_paths(job.data, base_dir)})
    return job


def map_paths(value: Any, fn: Callable[[Path], Path]) -> Any:
    """A copy of a config value with ``fn`` applied to every Path inside it (unchanged
    parts are shared, not copied)."""
    if isinstance(value, Path):
        return fn(value)
    if isinstance(value, list):
        items = [map_paths(v, fn) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, dict):
        mapped = {k: map_paths(v, fn) for k, v in value.items()}
        return value if all(mapped[k] is v for k, v in value.items()) else mapped
    if isinstance(value, BaseModel):
        update = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = map_paths(old, fn)
            if new is not old:
                update[name] = new
        return value.model_copy(update=update) if update else value
    return value


def _resolve_paths(value: Any, base_dir: Path) -> Any:
    """A copy of a data config with every relative path made absolute against base_dir."""
    return map_paths(value, lambda p: p if p.is_absolute() else (base_dir / p).resolve())


class _TooLarge(yaml.YAMLError):
    """A YAML document that would expand past MAX_YAML_NODES values, or into itself."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """The number of nodes of the document under ``root`` once every alias is written out,
    counted without writing them out (each node's size is computed once). Raises _TooLarge
    past ``limit`` or when an alias refers to a node that contains it."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # started but not finished: the ancestors of the current node
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > limit:
                raise _TooLarge(
                    f"holds more than {limit:,} values once its aliases (*name) are written out; "
                    "a job, data or consortium file needs nowhere near that many: write the repeated parts "
                    "out, or use fewer nested aliases"
                )
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise _TooLarge(f"has an alias that refers to a value containing it (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children)
    return size[id(root)]


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand past MAX_YAML_NODES values.

    PyYAML shares the object an alias names, so a "billion laughs" file (each anchor a
    list of ten aliases of the one before) loads in an instant as a small graph; whatever
    walks it afterwards (validation, an error message, a JSON dump) sees the expanded tree
    and never finishes. The composed graph is measured before any object is built."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, MAX_YAML_NODES)
        return node


def read_yaml(path: Path, what: str) -> Any:
    """The parsed content of a YAML file; ConfigError naming ``what`` (e.g. "job file")
    and the file when it is missing, not YAML, or too large once its aliases are expanded
    (more than MAX_YAML_NODES values)."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_BoundedLoader)
    except _TooLarge as e:
        raise ConfigError(f"{what} '{path}' {e}") from None
    except RecursionError:
        raise ConfigError(f"{what} '{path}' nests its values too deeply to read") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {e}") from None


def load_job(path: str | Path) -> Job:
    """Read and validate a YAML job file. Raises ConfigError naming the file and field."""
    path = Path(path)
    return parse_job(read_yaml(path, "job file"), source=str(path), base_dir=path.parent.resolve())


def builtin_job_path(name: str = "quickstart") -> Path:
    """The path of a job file shipped inside the package (``medfed run`` with no argument)."""
    return Path(__file__).parent / "examples" / f"{name}.yaml"
