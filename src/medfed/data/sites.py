"""Build and check every site's data for a job.

Readers return raw records per site (data/readers); here they are preprocessed (the
job's MONAI preprocessing steps), assigned to their split, stacked into tensors,
given the site's ``feature_shift`` and checked. Array sources (synthetic, MedMNIST) skip
the reading step but go through the same preprocessing, shift and checks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from medfed.config import (
    FolderData,
    Job,
    MedMNISTData,
    PairsData,
    SplitConfig,
    SyntheticData,
    SyntheticSegmentationData,
    TaskConfig,
    VolumesData,
)
from medfed.core.errors import DataError
from medfed.core.summary import SiteSummary, SkippedFile
from medfed.data.base import ArraySplit, Record, SiteData, SiteRecords

SPLITS = ("train", "val", "test")
Preprocess = Callable[[Record], Record]


def build_sites(job: Job, order: list[str] | None = None) -> list[SiteData]:
    """The sites of ``job``, in the job's order, each checked by :func:`check_site`.

    Synthetic data is generated from ``job.seed``; a data set that is split into sites
    (MedMNIST, a folder with ``partition``) is split by ``job.seed``; split fractions of
    undivided site files are drawn with ``job.seed``. Raises DataError naming the site,
    file and problem.

    A site's random draws (its split, its scanner signature) depend on its position in
    the job's site list; ``order`` gives that list when ``job.data`` holds only some of
    the sites (a deployed site reads only its own data).
    """
    index = {n: i for i, n in enumerate(order if order is not None else job.site_names)}
    seg = job.task.kind == "segmentation"
    dims = job.data_dims or 2
    preprocess = None
    if job.transforms.preprocess:
        from medfed.data.transforms import build_preprocess

        preprocess = build_preprocess(job.transforms.preprocess, dims, seg)
    data = job.data
    if isinstance(data, SyntheticData):
        if job.task.kind != "classification" or job.task.labels != "binary" or job.task.num_classes != 2:
            raise DataError(
                "synthetic data is binary (label 1 = lesion present) but the job's task is "
                f"'{getattr(job.task, 'labels', job.task.kind)}' with {job.task.num_classes} classes; "
                "set task.labels: binary"
            )
        from medfed.data.synthetic import make_synthetic_sites

        sites = [preprocess_site(s, preprocess) for s in make_synthetic_sites(data, job.seed)]
    elif isinstance(data, SyntheticSegmentationData):
        from medfed.data.synthetic_seg import make_synthetic_seg_sites

        sites = [preprocess_site(s, preprocess) for s in make_synthetic_seg_sites(data, job.task.num_classes, job.seed)]
    elif isinstance(data, MedMNISTData):
        from medfed.data.partition import partition_splits
        from medfed.data.readers.medmnist import load_medmnist

        splits = load_medmnist(data.path, job.task, dims=data.dims)
        if preprocess is not None:
            splits = {k: preprocess_split(v, preprocess, f"MedMNIST {k} split") for k, v in splits.items()}
        sites = partition_splits(splits, data.partition, job.task, job.seed)
    elif isinstance(data, FolderData):
        from medfed.data.readers.folder import read_folder

        read = read_folder(data, job.task)
        if data.partition is not None:
            from medfed.data.partition import partition_splits

            (pooled,) = read
            whole = assemble_site(pooled, preprocess, data.split, job.seed, -1, "the data set")
            sites = partition_splits({s: whole.split(s) for s in SPLITS}, data.partition, job.task, job.seed)
        else:
            sites = [assemble_site(r, preprocess, data.split, job.seed, index.get(r.name, i)) for i, r in enumerate(read)]
    elif isinstance(data, PairsData):
        from medfed.data.readers.pairs import read_pair_sites

        sites = [
            assemble_site(r, preprocess, data.split, job.seed, index.get(r.name, i))
            for i, r in enumerate(read_pair_sites(data))
        ]
    elif isinstance(data, VolumesData):
        from medfed.data.readers.volumes import read_volume_sites

        read = read_volume_sites(data, job.task.num_classes)
        sites = [assemble_site(r, preprocess, data.split, job.seed, index.get(r.name, i)) for i, r in enumerate(read)]
    else:  # pragma: no cover - the schema admits no other source
        raise DataError(f"unsupported data source {type(data).__name__}")
    if job.feature_shift:
        from medfed.data.shift import shift_site

        sites = [
            shift_site(s, job.feature_shift[s.name], job.seed, index[s.name]) if s.name in job.feature_shift else s
            for s in sites
        ]
    for site in sites:
        check_site(site, job.task)
    return sites


# --------------------------------------------------------------------------- records to tensors


def _split_records(
    records: list[Record], split: SplitConfig, seed: int, index: int
) -> dict[str, list[Record]]:
    """Records by split. Records that name their split keep it; the others are drawn
    into val and test by the ``split`` fractions (train gets the rest). When some
    records name a split but no record is in val (or test), that split is drawn from
    the training records."""
    rng = np.random.default_rng([seed, index, 2])
    out: dict[str, list[Record]] = {s: [r for r in records if r.split == s] for s in SPLITS}
    loose = [r for r in records if r.split is None]
    if loose:
        out["train"] = out["train"] + loose
    pool = out["train"]
    need = [s for s in ("val", "test") if not out[s]]
    if need and pool:
        order = rng.permutation(len(pool))
        take = {s: max(1, int(round(getattr(split, s) * len(pool)))) if len(pool) > 2 else 0 for s in need}
        start = 0
        for s in need:
            out[s] = [pool[i] for i in sorted(order[start : start + take[s]])]
            start += take[s]
        out["train"] = [pool[i] for i in sorted(order[start:])]
    return out


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
    return ArraySplit(
        images.contiguous(), labels, tuple(r.name for r in records), spacings.pop() if len(spacings) == 1 else None
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
    by_split = _split_records(records, split, seed, index)
    for s in SPLITS:
        if not by_split[s]:
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
    records = [
        Record(names[i], split.images[i].numpy(), split.labels[i].numpy(), split.spacing)
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


# --------------------------------------------------------------------------- checks


def _check_labels(y: torch.Tensor, task: TaskConfig, where: str) -> None:
    if task.labels == "multilabel":
        if y.ndim != 2 or y.shape[1] != task.num_classes or not y.dtype.is_floating_point:
            raise DataError(
                f"{where}: multi-label labels must be float of shape (N, {task.num_classes}), "
                f"got {y.dtype} {tuple(y.shape)}"
            )
        if not bool(((y == 0) | (y == 1)).all()):
            raise DataError(f"{where}: multi-label labels must be 0 or 1")
        return
    if y.ndim != 1 or y.dtype != torch.int64:
        raise DataError(f"{where}: labels must be int64 class indices of shape (N,), got {y.dtype} {tuple(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= task.num_classes:
        raise DataError(
            f"{where}: labels must be class indices in 0..{task.num_classes - 1} for a "
            f"{task.labels} task, found {lo}..{hi}"
        )


def _check_masks(split: ArraySplit, num_classes: int, where: str) -> None:
    y, spatial = split.labels, tuple(split.images.shape[2:])
    if y.dtype != torch.int64 or tuple(y.shape[1:]) != spatial:
        raise DataError(
            f"{where}: masks must be int64 of the images' spatial shape {spatial}, got {y.dtype} {tuple(y.shape[1:])}"
        )
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{where}: mask values must be class indices in 0..{num_classes - 1}, found {lo}..{hi}")


def check_site(site: SiteData, task) -> None:
    """Every split non-empty, images float32 of one shape and finite, labels (or masks)
    valid for ``task``. Raises DataError naming the site and split."""
    shape = tuple(site.train.images.shape[1:])
    for name in SPLITS:
        split = site.split(name)
        where = f"site '{site.name}' {name} split"
        if len(split) == 0:
            raise DataError(f"site '{site.name}' has no examples in its {name} split")
        if tuple(split.images.shape[1:]) != shape:
            raise DataError(f"{where}: images are {tuple(split.images.shape[1:])}, train images are {shape}")
        if split.images.dtype != torch.float32:
            raise DataError(f"{where}: images must be float32, got {split.images.dtype}")
        bad = int((~torch.isfinite(split.images)).sum())
        if bad:
            raise DataError(f"{where}: {bad} pixel value(s) are NaN or Inf")
        if task.kind == "segmentation":
            _check_masks(split, task.num_classes, where)
        else:
            _check_labels(split.labels, task, where)


def class_counts_of(labels: torch.Tensor, task) -> list[int]:
    """Classification: examples per class or positives per label. Segmentation: the
    number of examples in which each class appears."""
    if task.kind == "segmentation":
        flat = labels.reshape(len(labels), -1)
        return [int((flat == k).any(dim=1).sum()) for k in range(task.num_classes)]
    from medfed.data.partition import class_counts

    return class_counts(labels, task)


def describe_sites(sites: list[SiteData], task, held_out: list[str] | tuple[str, ...] = ()) -> list[SiteSummary]:
    """Per site, its :class:`~medfed.core.summary.SiteSummary`: split sizes, class counts
    per split (see :func:`class_counts_of`), the image shape, whether it is held out, and
    the files it skipped, as written to ``sites.json``."""
    return [
        SiteSummary(
            name=s.name,
            **{name: len(s.split(name)) for name in SPLITS},
            class_counts={name: class_counts_of(s.split(name).labels, task) for name in SPLITS},
            shape=list(s.train.images.shape[1:]),
            held_out=s.name in held_out,
            skipped=len(s.skipped),
            skipped_files=tuple(SkippedFile(file=f, reason=why) for f, why in s.skipped),
        )
        for s in sites
    ]
