"""Records to tensors: a site's records preprocessed, drawn into their splits and stacked
(``cache: memory``, and the array sources); the split draw is shared with streamed sites."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np
import torch

from medfed.config import SplitConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, Record, SiteData, SiteRecords, labeled_mask

SPLITS = ("train", "val", "test")
Preprocess = Callable[[Record], Record]


class _HasSplit(Protocol):
    @property
    def split(self) -> str | None: ...


Row = TypeVar("Row", bound=_HasSplit)


def split_rows(records: list[Row], split: SplitConfig, seed: int, index: int) -> dict[str, list[Row]]:
    """Records (or index entries) by split. Those that name their split keep it; the
    others are drawn into val and test by the ``split`` fractions (train gets the rest).
    When some name a split but none is in val (or test), that split is drawn from the
    training ones. Rows without a label (``labeled`` False) that name no split train:
    they are never drawn into val or test, which hold labeled examples only."""
    rng = np.random.default_rng([seed, index, 2])
    out: dict[str, list[Row]] = {s: [r for r in records if r.split == s] for s in SPLITS}
    loose = [r for r in records if r.split is None]
    if loose:
        out["train"] = out["train"] + loose
    unlabeled = [r for r in out["train"] if not getattr(r, "labeled", True)]
    pool = [r for r in out["train"] if getattr(r, "labeled", True)] if unlabeled else out["train"]
    need = [s for s in ("val", "test") if not out[s]]
    if need and pool:
        order = rng.permutation(len(pool))
        take = {s: max(1, int(round(getattr(split, s) * len(pool)))) if len(pool) > 2 else 0 for s in need}
        start = 0
        for s in need:
            out[s] = [pool[i] for i in sorted(order[start : start + take[s]])]
            start += take[s]
        out["train"] = [pool[i] for i in sorted(order[start:])] + unlabeled
    return out


def may_be_empty(split: str, rows: list) -> bool:
    """A site with unlabeled examples may have no val or test examples: it is evaluated on
    nothing there (data/labels.py); every other site needs all three splits."""
    return split != "train" and any(not getattr(r, "labeled", True) for r in rows)


def stack_records(records: list[Record], where: str) -> ArraySplit:
    """One tensor of images and one of targets; every record must have one shape."""
    if not records:
        return ArraySplit(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.int64))
    shapes: dict[tuple, list[str]] = {}
    for r in records:
        shapes.setdefault(tuple(r.image.shape), []).append(r.name)
    if len(shapes) > 1:
        desc = "; ".join(
            f"{shape} in {len(names)} file(s) e.g. '{names[0]}'" for shape, names in sorted(shapes.items(), key=lambda kv: -len(kv[1]))
        )
        raise DataError(
            f"{where}: images differ in size (C, *spatial): {desc}; add a resize or crop_or_pad "
            "step to transforms.preprocess"
        )
    spacings = {tuple(round(float(v), 4) for v in r.spacing) if r.spacing is not None else None for r in records}
    images = torch.from_numpy(np.stack([np.asarray(r.image, dtype=np.float32) for r in records]))
    targets = np.stack([np.asarray(r.target) for r in records])
    labels = torch.from_numpy(targets.astype(np.float32 if targets.dtype.kind == "f" else np.int64))
    labeled = None
    if not all(r.labeled for r in records):
        labeled = torch.tensor([r.labeled for r in records], dtype=torch.bool)
    return ArraySplit(
        images.contiguous(), labels, tuple(r.name for r in records), spacings.pop() if len(spacings) == 1 else None,
        labeled,
    )


def assemble_site(
    read: SiteRecords, preprocess: Preprocess | None, split: SplitConfig, seed: int, index: int, what: str | None = None
) -> SiteData:
    """A site's records preprocessed, split and stacked. ``index`` seeds the split draw."""
    where = what or f"site '{read.name}'"
    if not read.records:
        skipped = f" ({len(read.skipped)} file(s) skipped as unreadable)" if read.skipped else ""
        raise DataError(f"{where} has no examples{skipped}")
    records = [preprocess(r) for r in read.records] if preprocess is not None else read.records
    by_split = split_rows(records, split, seed, index)
    for s in SPLITS:
        if not by_split[s] and not may_be_empty(s, records):
            raise DataError(
                f"{where} has no examples in its {s} split ({len(records)} example(s) in all); "
                "a site needs at least 3 examples, one per split"
            )
    return SiteData(
        read.name, *(stack_records(by_split[s], f"{where} {s} split") for s in SPLITS), skipped=tuple(read.skipped)
    )


def preprocess_split(split: ArraySplit, preprocess: Preprocess, where: str) -> ArraySplit:
    """The preprocessing steps applied to every example of an in-memory split."""
    names = split.names or tuple(f"{where} #{i}" for i in range(len(split)))
    labeled = labeled_mask(split)
    records = [
        Record(names[i], split.images[i].numpy(), split.labels[i].numpy(), split.spacing, labeled=bool(labeled[i]))
        for i in range(len(split))
    ]
    return stack_records([preprocess(r) for r in records], where)


def preprocess_site(site: SiteData, preprocess: Preprocess | None) -> SiteData:
    if preprocess is None:
        return site
    return SiteData(
        site.name,
        *(preprocess_split(site.split(s), preprocess, f"site '{site.name}' {s} split") for s in SPLITS),
        skipped=site.skipped,
    )


