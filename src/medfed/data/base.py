"""In-memory site data: what a reader returns and what local training consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medfed.core.errors import DataError


@dataclass(frozen=True)
class ArraySplit:
    """One split of one site, held in memory.

    ``images``: float32, shape (N, C, H, W), intensities roughly in [0, 1].
    ``labels``: int64 of shape (N,) for binary and multi-class tasks (class index), or
    float32 of shape (N, K) of 0/1 for multi-label tasks.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> "ArraySplit":
        return ArraySplit(self.images[index], self.labels[index])

    @staticmethod
    def concat(parts: list["ArraySplit"]) -> "ArraySplit":
        return ArraySplit(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
        )


@dataclass(frozen=True)
class SiteData:
    """A site's train, val and test splits. ``name`` is the site name from the job."""

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit

    def split(self, which: str) -> ArraySplit:
        return {"train": self.train, "val": self.val, "test": self.test}[which]
