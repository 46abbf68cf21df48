"""Streamed site data (``data.cache: none`` or ``disk``): an index of the site's files is
built at start; each batch is read, preprocessed, checked and augmented when training or
evaluation asks for it, by a :class:`torch.utils.data.DataLoader` with ``loader.workers``
processes, over MONAI's :class:`~monai.data.Dataset` (``none``) or the disk cache
(:class:`~medfed.data.cache.DiskCache`, ``disk``).

Memory is bounded by the loader's settings (workers x prefetch batches), not by the
number of files. The batches are the ones an in-memory split gives for the same plan:
the loop plans each batch (its examples and augmentation seed) in the training process
and the workers only carry it out, so the same job and seed give the same model with
``cache: memory``, ``none`` or ``disk`` and with any number of workers.

A file that cannot be read when its batch comes (deleted, damaged since the index was
built) is left out of that batch and logged once under ``on_bad_file: skip``; under
``error`` the batch fails with a DataError naming the file. A worker process that dies,
or a batch not ready within ``loader.timeout`` seconds, is a DataError too, never a hang.
Workers are forked from the training process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medfed.config import LoaderConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, Augment, Batch, Entry, Planned, Record, labeled_mask
from medfed.data.readers.folder import UnreadableFile

log = logging.getLogger("medfed")

READER_VERSION = 1  # part of every disk cache key: raise it when a reader's output changes


def pipeline_key(preprocess_spec: Any, dims: int, segmentation: bool) -> str:
    """What the disk cache key takes from the job: the preprocessing steps (as JSON), the
    data's dimensions and task kind, and :data:`READER_VERSION`."""
    body = json.dumps([READER_VERSION, dims, segmentation, preprocess_spec], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


class Pipeline:
    """Entry -> checked example (deterministic: the disk cache keeps its output): the
    entry read, preprocessed, its pixels checked finite. Returns
    ``{"image", "target", "spacing"}``, or ``{"unreadable": [file, reason]}`` for a file
    that cannot be read on its own, or ``{"error": message}`` for any other DataError."""

    def __init__(self, preprocess, key: str):
        self.preprocess = preprocess
        self.key = key

    def __call__(self, entry: Entry) -> dict[str, Any]:
        try:
            record = entry.read()
            if self.preprocess is not None and not getattr(entry, "prepared", False):
                record = self.preprocess(record)
            image = np.asarray(record.image, dtype=np.float32)
            bad = int(np.count_nonzero(~np.isfinite(image)))
            if bad:
                file = entry.files()[0] if entry.files() else entry.name
                raise UnreadableFile(getattr(entry, "site", ""), file, f"{bad} pixel value(s) are NaN or Inf")
        except UnreadableFile as e:
            return {"unreadable": [e.path, e.reason]}
        except DataError as e:
            return {"error": str(e)}
        target = np.asarray(record.target)
        target = target.astype(np.float32 if target.dtype.kind == "f" else np.int64, copy=False)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "target": torch.from_numpy(np.ascontiguousarray(target)),
            "spacing": None if record.spacing is None else [float(v) for v in record.spacing],
        }


@dataclass(frozen=True, eq=False)
class TensorEntry:
    """An example already in memory and preprocessed (a site read with ``cache: memory``
    pooled with streamed ones for the centralized baseline)."""

    name: str
    split: str | None
    image: np.ndarray
    target: np.ndarray
    spacing: tuple[float, ...] | None
    prepared: bool = True

    def read(self) -> Record:
        return Record(self.name, self.image, self.target, self.spacing, self.split)

    def files(self) -> tuple[str, ...]:
        return ()


@dataclass
class LoadFailure:
    """What a worker sends back instead of a batch: the DataError's text."""

    message: str


def _identity(batch: Any) -> Any:
    return batch


@dataclass(frozen=True, eq=False)
class Store:
    """Where a streamed site's examples come from: its files every time (``cache_root``
    None), or the disk cache under ``cache_root``."""

    pipeline: Pipeline
    cache_root: Path | None = None

    def dataset(self, entries: list[Entry]) -> torch.utils.data.Dataset:
        """MONAI's :class:`~monai.data.Dataset` over ``entries``, or the disk cache."""
        if self.cache_root is None:
            from monai.data import Dataset

            return Dataset(data=entries, transform=self.pipeline)
        from medfed.data.cache import DiskCache

        return DiskCache(entries, self.pipeline, self.cache_root, self.pipeline.key)


@dataclass(frozen=True, eq=False)
class StreamSplit:
    """One split of a site read from its files batch by batch (see the module docstring).

    ``shape`` (C, *spatial) and ``spacing`` are those of the split's first readable
    example (found when the site's data is built); every example must have that shape.
    ``labels``: the classification targets from the index (a label-flipping attacker
    replaces them), None for segmentation (masks are read with the images). ``labeled``:
    which entries have a label (bool (N,)), None when all have."""

    site: str
    entries: tuple[Entry, ...]
    store: Store
    loader: LoaderConfig
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    labels: torch.Tensor | None
    on_bad_file: str = "error"
    skipped_late: dict[str, str] = field(default_factory=dict)  # file -> reason, found while streaming
    labeled: torch.Tensor | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def spatial_dims(self) -> int:
        return len(self.shape) - 1

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, index: torch.Tensor) -> StreamSplit:
        picked = [int(i) for i in index]
        labels = None if self.labels is None else self.labels[index]
        labeled = None if self.labeled is None else self.labeled[index]
        return replace(self, entries=tuple(self.entries[i] for i in picked), labels=labels, labeled=labeled,
                       skipped_late={})

    @cached_property
    def _dataset(self) -> torch.utils.data.Dataset:
        return self.store.dataset(list(self.entries))

    # ---------------------------------------------------------------- in the workers

    def load(self, index: tuple[int, ...], seed: int | None, augment: Augment | None = None) -> Batch | LoadFailure:
        """The examples ``index`` loaded (through the store), stacked and augmented with
        ``seed``. Runs in a loader worker; a DataError comes back as a :class:`LoadFailure`."""
        try:
            return self._load(index, seed, augment)
        except DataError as e:
            return LoadFailure(str(e))

    def _load(self, index: tuple[int, ...], seed: int | None, augment: Augment | None) -> Batch:
        images, targets, spacings, kept, skipped = [], [], [], [], []
        for i in index:
            item = self._dataset[i]
            entry = self.entries[i]
            if "unreadable" in item:
                file, reason = item["unreadable"]
                if self.on_bad_file != "skip":
                    raise DataError(f"site '{self.site}': '{file}': {reason} (example '{entry.name}')")
                skipped.append((str(file), str(reason)))
                continue
            if "error" in item:
                raise DataError(str(item["error"]))
            image = item["image"]
            if tuple(image.shape) != self.shape:
                raise DataError(
                    f"site '{self.site}': example '{entry.name}' is {tuple(image.shape)} (C, *spatial) after "
                    f"preprocessing but the split's first example is {self.shape}; add a resize or crop_or_pad step "
                    "to transforms.preprocess"
                )
            images.append(image)
            targets.append(item["target"])
            spacings.append(None if item["spacing"] is None else tuple(item["spacing"]))
            kept.append(i)
        x = torch.stack(images) if images else torch.zeros((0, *self.shape))
        if self.labels is not None:
            y = self.labels[torch.tensor(kept, dtype=torch.int64)]
        elif targets:
            y = torch.stack(targets)
        else:
            y = torch.zeros((0, *self.shape[1:]), dtype=torch.int64)
        if augment is not None and seed is not None and len(kept):
            x, y = augment(x, y, seed)
        labeled = None if self.labeled is None else self.labeled[torch.tensor(kept, dtype=torch.int64)]
        return Batch(x.contiguous(), y, tuple(spacings), tuple(skipped), labeled)

    # ---------------------------------------------------------------- in the training process

    def batches(self, plan: Iterable[Planned], augment: Augment | None = None, pin: bool = False) -> Iterator[Batch]:
        """The planned batches, read by the site's loader workers (see the module docstring).
        A plan of known length (a list) gets no more workers than it has batches, and none
        for a single batch (forking would cost more than it saves)."""
        from torch.utils.data import DataLoader

        workers = self.loader.workers
        if isinstance(plan, (list, tuple)):
            workers = 0 if len(plan) <= 1 else min(workers, len(plan))
        source = _Source(self, augment)
        loader = DataLoader(
            source,
            batch_sampler=_Plan(plan),
            collate_fn=_identity,
            num_workers=workers,
            prefetch_factor=self.loader.prefetch if workers else None,
            pin_memory=pin,
            timeout=self.loader.timeout if workers else 0,
            multiprocessing_context="fork" if workers else None,
            generator=torch.Generator().manual_seed(0),  # leaves the global generator (dropout) untouched
        )
        try:
            for item in loader:
                if isinstance(item, LoadFailure):
                    raise DataError(item.message)
                for file, reason in item.skipped:
                    if file not in self.skipped_late:
                        self.skipped_late[file] = reason
                        log.warning("site '%s': skipped '%s' (on_bad_file: skip): %s", self.site, file, reason)
                yield item
        except RuntimeError as e:  # the DataLoader's own failures: a worker died, a batch timed out
            text = str(e)
            if "DataLoader" not in text:
                raise
            raise DataError(
                f"site '{self.site}': reading its data failed: {text.splitlines()[0]}; lower data.loader.workers "
                "(each worker holds data.loader.prefetch batches), give the site more memory, or raise "
                "data.loader.timeout for slow storage"
            ) from None


class _Source(torch.utils.data.Dataset):
    """The split as the DataLoader sees it: each planned batch is one fetch."""

    def __init__(self, split: StreamSplit, augment: Augment | None):
        self.split, self.augment = split, augment

    def __getitems__(self, planned: tuple[tuple[int, ...], int | None]) -> Batch | LoadFailure:
        index, seed = planned
        return self.split.load(index, seed, self.augment)

    def __getitem__(self, i: int):  # pragma: no cover - batches are always fetched whole
        raise TypeError("a streamed split is read a planned batch at a time")

    def __len__(self) -> int:
        return len(self.split)


class _Plan:
    """The loop's plan as a DataLoader batch sampler (one pass); each batch travels to a
    worker as plain numbers, (positions, seed)."""

    def __init__(self, plan: Iterable[Planned]):
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], int | None]]:
        for p in self.plan:
            yield tuple(int(i) for i in p.index.tolist()), p.seed


def to_stream(split: ArraySplit | StreamSplit, like: StreamSplit) -> StreamSplit:
    """``split`` as a streamed split read like ``like`` (an in-memory split's examples
    become :class:`TensorEntry` rows)."""
    if isinstance(split, StreamSplit):
        return split
    names = split.names or tuple(f"example {i}" for i in range(len(split)))
    entries = tuple(
        TensorEntry(names[i], None, split.images[i].numpy(), split.labels[i].numpy(), split.spacing)
        for i in range(len(split))
    )
    labels = None if like.labels is None else split.labels
    return replace(like, entries=entries, shape=split.shape, spacing=split.spacing, labels=labels,
                   labeled=split.labeled, skipped_late={})


def concat_streams(parts: list[StreamSplit], site: str) -> StreamSplit:
    """One streamed split of ``parts`` in order, named ``site``, read with the first
    part's store and loader."""
    first = parts[0]
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        raise DataError(f"the pooled sites' examples differ in shape: {sorted(shapes)}; add a resize or crop_or_pad step")
    labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])  # type: ignore[misc]
    spacings = {p.spacing for p in parts}
    labeled = None
    if any(p.labeled is not None for p in parts):
        labeled = torch.cat([labeled_mask(p) for p in parts])
    return replace(
        first, site=site, entries=tuple(e for p in parts for e in p.entries), labels=labels,
        spacing=spacings.pop() if len(spacings) == 1 else None, skipped_late={}, labeled=labeled,
    )


def concat_splits(parts: list, site: str):
    """``parts`` (splits of several sites) as one split named ``site``: in memory when
    every part is, else streamed, in-memory parts becoming :class:`TensorEntry` rows."""
    if all(isinstance(p, ArraySplit) for p in parts):
        return ArraySplit.concat(parts)
    like = next(p for p in parts if isinstance(p, StreamSplit))
    return concat_streams([to_stream(p, like) for p in parts], site)
