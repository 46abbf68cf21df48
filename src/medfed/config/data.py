"""The job's ``data`` section: where each site's examples come from.

Generated data (``synthetic``, ``synthetic_segmentation``, ``synthetic_phantoms``), a MedMNIST file split into
sites (``medmnist``), image files with a CSV of labels (``folder``), image/mask pairs
(``pairs``) and image/label volumes (``volumes``); how one data set is split into sites
(:class:`PartitionConfig`) and a site's files into train/val/test (:class:`SplitConfig`).
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from medfed.config.dicom import DicomWindow, SegmentRef, class_key, segment_refs
from medfed.config.limits import MAX_EXAMPLES, MAX_SITES, SYNTHETIC_MAX_BYTES, SiteName, unique_names
from medfed.config.reading import CacheMode, LoaderConfig
from medfed.core.schema import Count, Frozen, NoBool, Real
from medfed.config.reconstruction import FastMRIData, PhantomData


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


def _fraction_field():
    """``labeled_fraction``: the share of a site's training labels kept, in (0, 1]; left out
    of the job's dumps when not given (older jobs keep their hash)."""
    return Field(None, gt=0, le=1, exclude_if=lambda v: v is None)


def _unlabeled_field():
    return Field(False, exclude_if=lambda v: not v)


def _one_label_rule(site: Any) -> None:
    """A site's label fields (data/labels.py): ``labeled_fraction`` keeps a seeded share of
    its training labels (the section's ``labeled_fraction`` when not given; val and test
    keep theirs); ``unlabeled: true`` makes it a site without labels: every training
    example unlabeled, and no val or test examples (it is evaluated on nothing).
    Unlabeled training examples train only with ``semi_supervised``."""
    if site.unlabeled and site.labeled_fraction is not None:
        raise ValueError("labeled_fraction: a site with unlabeled: true keeps no labels; give one or the other")


class SyntheticSite(Frozen):
    """One synthetic hospital: its size, label prevalence and scanner; ``labeled_fraction``
    and ``unlabeled``: see :func:`_one_label_rule`."""

    name: SiteName
    n_train: Count = Field(gt=0, le=MAX_EXAMPLES)
    n_val: Count = Field(20, gt=0, le=MAX_EXAMPLES)
    n_test: Count = Field(gt=0, le=MAX_EXAMPLES)
    prevalence: Real = Field(0.5, gt=0, lt=1)
    scanner: ScannerConfig = ScannerConfig()
    labeled_fraction: Real | None = _fraction_field()
    unlabeled: bool = _unlabeled_field()

    @model_validator(mode="after")
    def _labels(self) -> "SyntheticSite":
        _one_label_rule(self)
        return self


class _SyntheticSites(Frozen):
    """The site list shared by the synthetic sources: names unique, in the job's order."""

    sites: list[SyntheticSite] = Field(min_length=1, max_length=MAX_SITES)
    labeled_fraction: Real | None = _fraction_field()  # every site's, unless it gives its own

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
        return unique_names(v, "site names")


class MedMNISTData(Frozen):
    """A MedMNIST ``.npz`` file with its official train/val/test split, split into sites.
    ``dims: 2`` for the 2D sets (images (N, H, W) or (N, H, W, 3)), ``dims: 3`` for the 3D
    sets such as OrganMNIST3D (volumes (N, D, H, W))."""

    source: Literal["medmnist"]
    path: Path
    dims: Annotated[Literal[2, 3], NoBool] = 2
    partition: PartitionConfig
    labeled_fraction: Real | None = _fraction_field()  # every site's share of training labels kept

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
    ``train`` by the data's ``split`` fractions). ``cache`` and ``loader``, when given,
    replace the data section's for this site. ``acceleration`` (a reconstruction task
    only): the undersampling of this site's images, else the task's."""

    name: SiteName
    images: Path | None = None
    masks: Path | None = None
    csv: Path | None = None
    train: FileSet | None = None
    val: FileSet | None = None
    test: FileSet | None = None
    cache: CacheMode | None = None
    loader: LoaderConfig | None = None
    # a reconstruction job: this site's undersampling, else the task's (the site's scanner protocol)
    acceleration: Real | None = Field(None, ge=1, le=64, exclude_if=lambda v: v is None)
    labeled_fraction: Real | None = _fraction_field()  # and unlabeled: see _one_label_rule
    unlabeled: bool = _unlabeled_field()

    @model_validator(mode="after")
    def _one_layout(self) -> "FileSite":
        _one_label_rule(self)
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
    unique_names([s.name for s in v], "site names")
    return v


def _sites_with_masks(v: list[FileSite], need: str) -> list[FileSite]:
    """Sites with unique names, each file set with its masks folder (``need`` says why)."""
    _site_list(v)
    for s in v:
        for split, fs in s.file_sets().items():
            if fs.masks is None:
                raise ValueError(f"site '{s.name}'{_split_label(split)}: {need}")
    return v


class SitesBy(Frozen):
    """A natural split: the value of ``column`` in the CSV names each row's site; ``sites``
    lists the values that are sites (a row with another value is an error)."""

    column: str = Field(min_length=1)
    sites: list[SiteName] = Field(min_length=1, max_length=MAX_SITES)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[str]) -> list[str]:
        return unique_names(v, "site names")


OnBadFile = Literal["error", "skip"]


class _FileReading(Frozen):
    """How a file source is read (the same examples either way; see docs/data.md).

    ``cache``: ``memory`` reads and preprocesses every file at start and holds the
    tensors; ``none`` streams: an index of the files is built at start and each batch is
    read and preprocessed when it is needed, by ``loader.workers`` processes; ``disk``
    streams from a cache of preprocessed examples written once under ``cache_dir``
    (default: ``.medfed-cache`` next to the run folder in a simulation, the user's cache
    folder at a deployed site), reused while the files and the preprocessing are
    unchanged. ``auto`` (default) is ``memory`` when the preprocessed examples of a site
    take at most 1 GiB, else ``none``. A site's own ``cache`` and ``loader`` replace these.
    """

    cache: CacheMode = "auto"
    cache_dir: Path | None = None
    loader: LoaderConfig = LoaderConfig()
    labeled_fraction: Real | None = _fraction_field()  # every site's, unless it gives its own

    def reading(self, site: str) -> tuple[CacheMode, LoaderConfig]:
        """The cache mode and loader settings of ``site``: its own, else the section's."""
        for s in getattr(self, "sites", None) or []:
            if isinstance(s, FileSite) and s.name == site:
                return s.cache or self.cache, s.loader or self.loader
        return self.cache, self.loader


class FolderData(_FileReading):
    """Image files (PNG, JPEG, TIFF, DICOM) with a CSV of labels, for classification.

    The CSV has a ``file_column`` (path relative to the images folder) and the
    ``label_columns``: one column of class indices (binary, multi-class) or one 0/1 column
    per label (multi-label); other columns are metadata. A ``split_column`` with values
    train/val/test fixes each row's split; without one, ``split`` fractions are drawn.

    Sites: each site its own folder and CSV (``sites``), or one folder and CSV split by a
    metadata column (``sites_by``, the natural split) or by a ``partition``.
    ``channels``: 1 reads grey, 3 reads RGB. ``on_bad_file: skip`` leaves out unreadable
    files and reports them by name, per site. ``dicom_window`` replaces the windows of the
    DICOM files (see :class:`DicomWindow`).
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
    dicom_window: DicomWindow | None = None

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


class PairsData(_FileReading):
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
        return _sites_with_masks(v, "image/mask pairs need a masks folder")

    @field_validator("mask_values")
    @classmethod
    def _values_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"mask values must be distinct, got {v}")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class VolumesData(_FileReading):
    """3D segmentation: image volumes and label volumes matched by name. ``format: nifti``
    reads ``.nii``/``.nii.gz`` files; ``format: dicom`` reads each sub-folder of the images
    folder as one series (or each file as a multi-frame volume). Masks are NIfTI label
    volumes named after the image (file stem or series folder name), holding class indices.
    Spacing is kept; resample with a ``spacing`` preprocessing step.

    ``masks_format: seg`` (with ``format: dicom``): the masks folder holds DICOM SEG files
    instead, each matched to the series whose SOP instances it references, not by name.
    ``segments`` maps class indices to the SEG segments that make them, by SegmentLabel or
    segment number, one or a list (``{1: liver, 2: [tumour, 3]}``); segments it leaves out
    are background. Without it, segment number k is class k."""

    source: Literal["volumes"]
    format: Literal["nifti", "dicom"] = "nifti"
    sites: list[FileSite] = Field(min_length=1, max_length=MAX_SITES)
    split: SplitConfig = SplitConfig()
    on_bad_file: OnBadFile = "error"
    masks_format: Literal["nifti", "seg"] = "nifti"
    # class index (keys are ints; JSON's string keys parse back to them) -> its segment(s)
    segments: dict[Annotated[int, BeforeValidator(class_key)],
                   Annotated[SegmentRef | list[SegmentRef], BeforeValidator(segment_refs)]] | None = None

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[FileSite]) -> list[FileSite]:
        return _sites_with_masks(v, "volumes need a masks folder of label volumes")

    @model_validator(mode="after")
    def _seg_masks(self) -> "VolumesData":
        if self.masks_format == "seg" and self.format != "dicom":
            raise ValueError("masks_format: seg reads DICOM SEG masks of DICOM series; set format: dicom")
        if self.segments is None:
            return self
        if self.masks_format != "seg":
            raise ValueError("segments maps DICOM SEG segments to classes; it needs masks_format: seg")
        if not self.segments:
            raise ValueError("segments: give at least one class, e.g. {1: liver}, or leave it out (segment k is class k)")
        seen: dict[Any, int] = {}
        for cls_index, refs in self.segments.items():
            for ref in refs if isinstance(refs, list) else [refs]:
                if ref in seen:
                    raise ValueError(f"segments: segment {ref!r} is given for class {seen[ref]} and class {cls_index}")
                seen[ref] = cls_index
        return self

    def segment_map(self) -> dict[int, list[int | str]] | None:
        """``segments`` with every class's segments as a list; None when not given."""
        if self.segments is None:
            return None
        return {k: list(v) if isinstance(v, list) else [v] for k, v in self.segments.items()}

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
