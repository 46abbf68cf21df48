"""File sources (``folder``, ``pairs``, ``volumes``) made into sites, by each site's
``data.cache``: read whole into memory, or streamed batch by batch (data/stream.py).

Either way the site's files are indexed first (data/readers, no pixels read). Then:

- ``memory``: every file read and preprocessed at start, the records drawn into their
  splits and stacked (data/assemble.py); an unreadable file under ``on_bad_file: skip``
  is left out before the split draw.
- ``none`` / ``disk``: the index entries drawn into their splits by the same draw; the
  first example of each split is read to learn the example shape (and, for ``disk``,
  cached). Files that turn out unreadable are left out of their batch when it is read.
- ``auto``: ``memory`` when the site's preprocessed examples would take at most
  :data:`AUTO_MEMORY_BYTES` (estimated from its first example), else ``none``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from medfed.config import CacheMode, FolderData, Job, PairsData, TaskConfig, VolumesData
from medfed.core.errors import DataError
from medfed.data.assemble import SPLITS, Preprocess, assemble_site, may_be_empty, split_rows
from medfed.data.base import Entry, SiteData, SiteIndex
from medfed.data.stream import Pipeline, Store, StreamSplit, pipeline_key

log = logging.getLogger("medfed")

AUTO_MEMORY_BYTES = 1 << 30  # cache: auto holds a site in memory up to this much preprocessed data
CACHE_FOLDER = ".medfed-cache"

FileData = FolderData | PairsData | VolumesData


def default_cache_root(job: Job) -> Path:
    """Where ``cache: disk`` writes when the data section names no ``cache_dir``, in a
    simulation: ``.medfed-cache`` next to the run folder."""
    return Path(job.output).resolve().parent / CACHE_FOLDER


def user_cache_root() -> Path:
    """Where ``cache: disk`` writes at a deployed site that names no ``cache_dir``: the
    user's cache folder (``$XDG_CACHE_HOME/medfed``, else ``~/.cache/medfed``), outside
    the kit and the data folders."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "medfed"


def index_source(data: FileData, task: TaskConfig) -> list[SiteIndex]:
    """Every site's index of files (see data/readers), without reading a pixel."""
    if isinstance(data, FolderData):
        from medfed.data.readers.folder import index_folder

        return index_folder(data, task)
    if isinstance(data, PairsData):
        from medfed.data.readers.pairs import index_pair_sites

        return index_pair_sites(data)
    from medfed.data.readers.volumes import index_volume_sites

    return index_volume_sites(data, task.num_classes)


class FileReading:
    """Makes sites of a file source's indexes for ``job`` (see the module docstring)."""

    def __init__(self, job: Job, data: FileData, preprocess: Preprocess | None, cache_root: Path):
        self.job, self.data, self.preprocess, self.cache_root = job, data, preprocess, cache_root
        self.segmentation = job.task.kind == "segmentation"
        spec: list = [step.model_dump(mode="json") for step in job.transforms.preprocess]
        if getattr(job.model, "bundle_transforms", False):  # read through the bundle's preprocessing
            spec.append({"bundle_sha256": job.model.bundle_sha256})  # type: ignore[union-attr]
        self.pipeline = Pipeline(preprocess, pipeline_key(spec, job.data_dims or 2, self.segmentation))

    def site(self, index: SiteIndex, position: int, what: str | None = None) -> SiteData:
        """The site of ``index``; ``position`` (its place in the job's site list) seeds its
        split draw."""
        where = what or f"site '{index.name}'"
        if not index.entries:
            raise DataError(f"{where} has no examples")
        cache, loader = self.data.reading(index.name)
        if cache == "auto":
            cache = self._auto(index, where)
        if cache == "memory":
            from medfed.data.readers.folder import read_entries

            records = read_entries(index, self.data.on_bad_file, self.preprocess)  # each preprocessed as read
            return assemble_site(records, None, self.data.split, self.job.seed, position, what)
        root = None
        if cache == "disk":
            from medfed.data.cache import prepare_cache_dir

            prepare_cache_dir(self.cache_root, index.name)
            root = self.cache_root
        store = Store(self.pipeline, root)
        by_split = split_rows(index.entries, self.data.split, self.job.seed, position)
        splits = {}
        for s in SPLITS:
            if not by_split[s] and may_be_empty(s, index.entries):
                splits[s] = self._stream(index.name, index.entries[:1], store, loader, f"{where} {s} split").subset(
                    torch.zeros(0, dtype=torch.int64))  # no labeled examples there: evaluated on nothing
                continue
            if not by_split[s]:
                raise DataError(
                    f"{where} has no examples in its {s} split ({len(index.entries)} example(s) in all); "
                    "a site needs at least 3 examples, one per split"
                )
            splits[s] = self._stream(index.name, by_split[s], store, loader, f"{where} {s} split")
        return SiteData(index.name, splits["train"], splits["val"], splits["test"])

    def named(self, site: SiteData) -> SiteData:
        """A site of a partitioned data set, its streamed splits renamed after it."""
        def rename(split):
            return replace(split, site=site.name) if isinstance(split, StreamSplit) else split

        return SiteData(site.name, rename(site.train), rename(site.val), rename(site.test), site.skipped)

    def _first(self, entries: list[Entry], store: Store | None, where: str) -> dict:
        """The first example of ``entries`` that reads (through ``store``, else directly)."""
        for entry in entries:
            item = store.dataset([entry])[0] if store is not None else self.pipeline(entry)
            if "image" in item:
                return item
            if "error" in item:
                raise DataError(str(item["error"]))
            file, reason = item["unreadable"]
            if self.data.on_bad_file != "skip":
                raise DataError(f"{where}: '{file}': {reason}")
        raise DataError(f"{where}: none of its {len(entries)} file(s) can be read")

    def _stream(self, site: str, entries: list[Entry], store: Store, loader, where: str) -> StreamSplit:
        first = self._first(entries, store, where)
        labels = None
        if not self.segmentation:
            labels = torch.stack([torch.as_tensor(e.target) for e in entries])  # type: ignore[misc]
        spacing = None if first["spacing"] is None else tuple(first["spacing"])
        labeled = None
        if not all(getattr(e, "labeled", True) for e in entries):  # CSV rows without a label
            labeled = torch.tensor([getattr(e, "labeled", True) for e in entries], dtype=torch.bool)
        return StreamSplit(site, tuple(entries), store, loader, tuple(first["image"].shape), spacing, labels,
                           self.data.on_bad_file, labeled=labeled)

    def _auto(self, index: SiteIndex, where: str) -> CacheMode:
        """``memory`` when the site's preprocessed examples fit :data:`AUTO_MEMORY_BYTES`."""
        first = self._first(index.entries, None, where)
        per_example = math.prod(first["image"].shape) * 4
        if self.segmentation:
            per_example += math.prod(first["image"].shape[1:]) * 8
        total = per_example * len(index.entries)
        if total <= AUTO_MEMORY_BYTES:
            return "memory"
        log.info("%s: %d examples take about %.1f GiB preprocessed, more than data.cache: auto holds in memory; "
                 "streaming them from their files (set data.cache: disk to keep them preprocessed on disk)",
                 where, len(index.entries), total / 2**30)
        return "none"
