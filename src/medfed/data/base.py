"""Site data: what readers return and what local training and evaluation consume.

A site's split is either held in memory (:class:`ArraySplit`) or streamed from its files
(:class:`medfed.data.stream.StreamSplit`); both give batches the same way
(:meth:`ArraySplit.batches`), so training and evaluation do not know which they read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from medfed.core.errors import DataError


# (images, labels, seed) -> (images, labels): random augmentation of one batch
Augment = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Planned:
    """One batch as the training or evaluation loop plans it: the examples' positions in
    the split and the seed of its augmentation (None: not augmented)."""

    index: torch.Tensor
    seed: int | None = None


@dataclass
class Batch:
    """One batch ready for the model: ``images`` (B, C, *spatial), ``labels`` as the split
    holds them, ``spacings`` per example (None where unknown), and the files left out of
    it as unreadable under ``on_bad_file: skip``, as (file, reason). A batch can be empty
    (its examples all skipped, or an empty Poisson draw). ``labeled``: bool (B,), which
    examples have a label (the others hold a placeholder label); None: all of them."""

    images: torch.Tensor
    labels: torch.Tensor
    spacings: tuple[tuple[float, ...] | None, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    labeled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> "Batch":
        """Page-locked copies, for a DataLoader with ``pin_memory`` (CUDA)."""
        labeled = None if self.labeled is None else self.labeled.pin_memory()
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.spacings, self.skipped, labeled)


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
    ``labeled``: bool (N,), which examples have a label (a training split with labels
    missing or hidden, data/labels.py); the others hold a placeholder label (zeros).
    None (default): every example is labeled.
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...] | None = None
    spacing: tuple[float, ...] | None = None
    labeled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5):
            raise DataError(
                f"images must have shape (N, C, H, W) or (N, C, D, H, W), got {tuple(self.images.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise DataError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.names is not None and len(self.names) != self.images.shape[0]:
            raise DataError(f"{self.images.shape[0]} images but {len(self.names)} names")
        if self.labeled is not None and (self.labeled.dtype != torch.bool or self.labeled.shape != (len(self.images),)):
            raise DataError(f"{self.images.shape[0]} images but a labeled mask of {self.labeled.dtype} "
                            f"{tuple(self.labeled.shape)}")

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape, (C, *spatial)."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, plan: Iterable[Planned], augment: Augment | None = None, pin: bool = False) -> Iterator[Batch]:
        """The planned batches, augmented on the CPU when ``augment`` is given (``pin`` is
        for streamed splits; these tensors are already in memory)."""
        spacings = (self.spacing,)
        for p in plan:
            x, y = self.images[p.index], self.labels[p.index]
            if augment is not None and p.seed is not None and len(p.index):
                x, y = augment(x, y, p.seed)
            labeled = None if self.labeled is None else self.labeled[p.index]
            yield Batch(x, y, spacings * len(p.index), labeled=labeled)

    def subset(self, index: torch.Tensor) -> "ArraySplit":
        names = None if self.names is None else tuple(self.names[int(i)] for i in index)
        labeled = None if self.labeled is None else self.labeled[index]
        return ArraySplit(self.images[index], self.labels[index], names, self.spacing, labeled)

    @staticmethod
    def concat(parts: list["ArraySplit"]) -> "ArraySplit":
        names = None
        if all(p.names is not None for p in parts):
            names = tuple(n for p in parts for n in p.names)  # type: ignore[union-attr]
        spacings = {p.spacing for p in parts}
        labeled = None
        if any(p.labeled is not None for p in parts):
            labeled = torch.cat([labeled_mask(p) for p in parts])
        return ArraySplit(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            names,
            spacings.pop() if len(spacings) == 1 else None,
            labeled,
        )


def labeled_mask(split: "ArraySplit | Examples") -> torch.Tensor:
    """bool (N,): which examples of ``split`` have a label (all, when it records none missing)."""
    return split.labeled if split.labeled is not None else torch.ones(len(split), dtype=torch.bool)


class Examples(Protocol):
    """One split of a site, in memory or streamed: what training and evaluation use.

    ``labels``: classification targets (class indices or 0/1 rows) when known without
    reading pixels, for the summaries, the partition and label flipping; streamed
    segmentation splits hold None (the masks are read with the images). ``labeled``:
    which examples have a label (bool (N,)), None when all have."""

    names: tuple[str, ...] | None
    spacing: tuple[float, ...] | None
    labels: torch.Tensor | None
    labeled: torch.Tensor | None

    def __len__(self) -> int: ...

    def subset(self, index: torch.Tensor) -> "Examples": ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def spatial_dims(self) -> int: ...

    def batches(self, plan: Iterable[Planned], augment: Augment | None = None, pin: bool = False) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class SiteData:
    """A site's train, val and test splits. ``name`` is the site name from the job.
    ``skipped``: files left out under ``on_bad_file: skip``, as (file, reason), found when
    the site's data was built (a streamed split also counts the files that fail later)."""

    name: str
    train: Examples
    val: Examples
    test: Examples
    skipped: tuple[tuple[str, str], ...] = ()

    def split(self, which: str) -> Examples:
        return {"train": self.train, "val": self.val, "test": self.test}[which]


@dataclass(frozen=True)
class Record:
    """One example as a reader returns it, before preprocessing.

    ``image``: float32 (C, *spatial). ``target``: for classification an int64 scalar
    array (class index) or float32 (K,) of 0/1 (multi-label); for segmentation an int64
    mask of class indices with the image's spatial shape. ``spacing``: mm per pixel or
    voxel along the spatial axes, when the format records it. ``split``: train, val or
    test when the source says so, else None (drawn later from the job's fractions).
    ``labeled``: False for an example without a label (a CSV row with its label cells
    empty); its ``target`` is then a placeholder of zeros.
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    spacing: tuple[float, ...] | None = None
    split: str | None = None
    labeled: bool = True


class Entry(Protocol):
    """One example before its pixels are read: an index row. ``target``: the class target
    when the index knows it (a CSV label), else None (a mask read with the image).
    ``read()`` reads the file(s) into a :class:`Record` (raising ``UnreadableFile`` for a
    file that cannot be read on its own); ``files()`` lists what it reads, for the disk
    cache's key."""

    name: str
    split: str | None
    target: np.ndarray | None

    def read(self) -> Record: ...

    def files(self) -> Sequence[str]: ...


@dataclass
class SiteIndex:
    """What a file reader indexes for one site: its entries, in a fixed order."""

    name: str
    entries: list[Entry] = field(default_factory=list)


@dataclass
class SiteRecords:
    """What a file reader returns for one site: its records and the files it skipped
    (``on_bad_file: skip``) with the reason for each."""

    name: str
    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
