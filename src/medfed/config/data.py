"""The job's ``data`` section: where each site's examples come from.

Generated data (``synthetic``, ``synthetic_segmentation``, ``synthetic_phantoms``), a MedMNIST file split into
sites (``medmnist``), image files with a CSV of labels (``folder``), image/mask pairs
(``pairs``) and image/label volumes (``volumes``), MRI phantoms and fastMRI files; the
union of them all (:data:`DataConfig`). The file sources are in ``file_sources.py``, how a
data set is split into sites and a site's files into splits in ``partition.py``, the label
fields every source shares in ``site_labels.py``.
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from medfed.config.file_sources import (  # noqa: F401 (re-exported: their home before the split)
    FileSet, FileSite, FolderData, OnBadFile, PairsData, SitesBy, VolumesData,
)
from medfed.config.limits import MAX_EXAMPLES, MAX_SITES, SYNTHETIC_MAX_BYTES, SiteName, unique_names
from medfed.config.partition import PartitionConfig, SplitConfig  # noqa: F401 (re-exported)
from medfed.config.reconstruction import FastMRIData, PhantomData
from medfed.config.site_labels import fraction_field, one_label_rule, unlabeled_field
from medfed.core.schema import Count, Frozen, NoBool, Real


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
    """One synthetic hospital: its size, label prevalence and scanner; ``labeled_fraction``
    and ``unlabeled``: see :func:`~medfed.config.site_labels.one_label_rule`."""

    name: SiteName
    n_train: Count = Field(gt=0, le=MAX_EXAMPLES)
    n_val: Count = Field(20, gt=0, le=MAX_EXAMPLES)
    n_test: Count = Field(gt=0, le=MAX_EXAMPLES)
    prevalence: Real = Field(0.5, gt=0, lt=1)
    scanner: ScannerConfig = ScannerConfig()
    labeled_fraction: Real | None = fraction_field()
    unlabeled: bool = unlabeled_field()

    @model_validator(mode="after")
    def _labels(self) -> "SyntheticSite":
        one_label_rule(self)
        return self


class _SyntheticSites(Frozen):
    """The site list shared by the synthetic sources: names unique, in the job's order."""

    sites: list[SyntheticSite] = Field(min_length=1, max_length=MAX_SITES)
    labeled_fraction: Real | None = fraction_field()  # every site's, unless it gives its own

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[SyntheticSite]) -> list[SyntheticSite]:
        unique_names([s.name for s in v], "site names")
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


class MedMNISTData(Frozen):
    """A MedMNIST ``.npz`` file with its official train/val/test split, split into sites.
    ``dims: 2`` for the 2D sets (images (N, H, W) or (N, H, W, 3)), ``dims: 3`` for the 3D
    sets such as OrganMNIST3D (volumes (N, D, H, W))."""

    source: Literal["medmnist"]
    path: Path
    dims: Annotated[Literal[2, 3], NoBool] = 2
    partition: PartitionConfig
    labeled_fraction: Real | None = fraction_field()  # every site's share of training labels kept

    @property
    def site_names(self) -> list[str]:
        return list(self.partition.sites)


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
    elif isinstance(data, PhantomData):  # the zero-filled input and the ground truth
        shape, per_pixel = (1, data.image_size, data.image_size), 4 + 4
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
    Union[
        SyntheticData, MedMNISTData, FolderData, PairsData, VolumesData, SyntheticSegmentationData, PhantomData,
        FastMRIData,
    ],
    Field(discriminator="source"),
]

SEGMENTATION_SOURCES = ("pairs", "volumes", "synthetic_segmentation")
