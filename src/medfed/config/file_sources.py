"""The file sources of the job's ``data`` section: image files with a CSV of labels
(``folder``), image/mask pairs (``pairs``) and image/label volumes (``volumes``), and a
site's files (:class:`FileSite`)."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from medfed.config.dicom import DicomWindow, SegmentRef, class_key, segment_refs
from medfed.config.limits import MAX_SITES, SiteName, unique_names
from medfed.config.partition import PartitionConfig, SplitConfig
from medfed.config.reading import CacheMode, LoaderConfig
from medfed.config.site_labels import fraction_field, one_label_rule, unlabeled_field
from medfed.core.schema import Count, Frozen, NoBool, Real


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
    labeled_fraction: Real | None = fraction_field()  # and unlabeled: see _one_label_rule
    unlabeled: bool = unlabeled_field()

    @model_validator(mode="after")
    def _one_layout(self) -> "FileSite":
        one_label_rule(self)
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
    labeled_fraction: Real | None = fraction_field()  # every site's, unless it gives its own

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
