"""In-memory site data: what readers return and what local training consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medfed.core.errors import DataError


@dataclass(frozen=True)
class ArraySplit:
    """One split of one site, held in memory.

    ``images``: float32 of shape (N, C, H, W) or, for volumes, (N, C, D, H, W).
    ``labels``: for classification int64 (N,) class indices (binary, multi-class) or
    float32 (N, K) of 0/1 (multi-label); for segmentation int64 masks of class indices
    with the images' spatial shape, (N, H, W) or (N, D, H, W).
    ``names``: where each example came from (file name), when known.
    ``spacing``: millimetres per pixel or voxel along the spatial axes, when all examples
    share one (after resampling) and it is known.
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...] | None = None
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5):
            raise DataError(
                f"images must have shape (N, C, H, W) or (N, C, D, H, W), got {tuple(self.images.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise DataError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.names is not None and len(self.names) != self.images.shape[0]:
            raise DataError(f"{self.images.shape[0]} images but {len(self.names)} names")

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> "ArraySplit":
        names = None if self.names is None else tuple(self.names[int(i)] for i in index)
        return ArraySplit(self.images[index], self.labels[index], names, self.spacing)

    @staticmethod
    def concat(parts: list["ArraySplit"]) -> "ArraySplit":
        names = None
        if all(p.names is not None for p in parts):
            names = tuple(n for p in parts for n in p.names)  # type: ignore[union-attr]
        spacings = {p.spacing for p in parts}
        return ArraySplit(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            names,
            spacings.pop() if len(spacings) == 1 else None,
        )


@dataclass(frozen=True)
class SiteData:
    """A site's train, val and test splits. ``name`` is the site name from the job.
    ``skipped``: files left out under ``on_bad_file: skip``, as (file, reason)."""

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    skipped: tuple[tuple[str, str], ...] = ()

    def split(self, which: str) -> ArraySplit:
        return {"train": self.train, "val": self.val, "test": self.test}[which]


@dataclass(frozen=True)
class Record:
    """One example as a reader returns it, before preprocessing.

    ``image``: float32 (C, *spatial). ``target``: for classification an int64 scalar
    array (class index) or float32 (K,) of 0/1 (multi-label); for segmentation an int64
    mask of class indices with the image's spatial shape. ``spacing``: mm per pixel or
    voxel along the spatial axes, when the format records it. ``split``: train, val or
    test when the source says so, else None (drawn later from the job's fractions).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    spacing: tuple[float, ...] | None = None
    split: str | None = None


@dataclass
class SiteRecords:
    """What a file reader returns for one site: its records and the files it skipped
    (``on_bad_file: skip``) with the reason for each."""

    name: str
    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
