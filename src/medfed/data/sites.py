"""Build and check every site's data for a job.

File readers (data/readers) index each site's files; then, by the site's ``data.cache``,
either every file is read, preprocessed (the job's MONAI preprocessing steps), assigned
to its split and stacked into tensors (``memory``), or the entries are assigned to their
split and read batch by batch when needed (``none``, ``disk``: data/stream.py). Array
sources (synthetic, MedMNIST) are held in memory and go through the same preprocessing.
Then the site's ``feature_shift`` (in memory only) and the checks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medfed.config import (
    FastMRIData,
    FolderData,
    Job,
    MedMNISTData,
    PairsData,
    PhantomData,
    SyntheticData,
    SyntheticSegmentationData,
    TaskConfig,
    VolumesData,
    reads_kspace,
)
from medfed.core.errors import DataError
from medfed.core.summary import SiteSummary, SkippedFile
from medfed.data.assemble import SPLITS, assemble_site, preprocess_site, preprocess_split, stack_records
from medfed.data.base import ArraySplit, SiteData
from medfed.data.kspace_input import is_packed, window_size
from medfed.data.labels import count_unlabeled
from medfed.data.reading import FileReading, default_cache_root, index_source

__all__ = ["assemble_site", "build_sites", "check_site", "describe_sites", "stack_records"]


def build_sites(job: Job, order: list[str] | None = None, cache_root: Path | None = None,
                label_rules: bool = True) -> list[SiteData]:
    """The sites of ``job``, in the job's order, each checked by :func:`check_site`.

    Synthetic data is generated from ``job.seed``; a data set that is split into sites
    (MedMNIST, a folder with ``partition``) is split by ``job.seed``; split fractions of
    undivided site files are drawn with ``job.seed``. Raises DataError naming the site,
    file and problem.

    A site's random draws (its split, its scanner signature) depend on its position in
    the job's site list; ``order`` gives that list when ``job.data`` holds only some of
    the sites (a deployed site reads only its own data). ``cache_root``: where
    ``cache: disk`` writes when the data section names no ``cache_dir`` (default
    :func:`default_cache_root`). ``label_rules`` False: the labels are read and dropped (a
    reconstruction reading an image source), so a CSV row without one is kept like any other.
    """
    index = {n: i for i, n in enumerate(order if order is not None else job.site_names)}
    if job.task.kind == "reconstruction" and not isinstance(job.data, (PhantomData, FastMRIData)):
        # an image source: read as its own task would read it, then its images become ground truth
        from medfed.data.kspace import image_source_task, reconstruction_sites

        read = build_sites(job.model_copy(update={"task": image_source_task(job.data)}), order, cache_root, False)
        if isinstance(job.data, VolumesData):  # split by volume as the source does, then cut into 2D slices
            from medfed.data.slices import slice_sites

            read = slice_sites(read, job.task, job.data)
        accelerations = {s.name: getattr(s, "acceleration", None) for s in (getattr(job.data, "sites", None) or [])}
        sites = reconstruction_sites(read, job.task, job.seed, index, accelerations, reads_kspace(job.model))
        for site in sites:
            check_site(site, job.task)
        return sites
    seg = job.task.kind == "segmentation"
    dims = job.data_dims or 2
    preprocess = None
    if job.transforms.preprocess:
        from medfed.data.transforms import build_preprocess

        preprocess = build_preprocess(job.transforms.preprocess, dims, seg)
    elif getattr(job.model, "bundle_transforms", False):  # the MONAI Bundle's own preprocessing
        from medfed.bundles import bundle_preprocess

        preprocess = bundle_preprocess(job.model, dims, seg)  # type: ignore[arg-type]
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
    elif isinstance(data, PhantomData):  # reconstruction: zero-filled input, ground-truth target
        from medfed.data.phantoms import make_phantom_sites

        sites = make_phantom_sites(data, job.task, job.seed, reads_kspace(job.model))  # type: ignore[arg-type]
    elif isinstance(data, FastMRIData):
        from medfed.data.readers.fastmri import make_fastmri_sites

        sites = make_fastmri_sites(data, job.task, job.seed, reads_kspace(job.model))  # type: ignore[arg-type]
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
    elif isinstance(data, (FolderData, PairsData, VolumesData)):
        reading = FileReading(job, data, preprocess, Path(data.cache_dir) if data.cache_dir else cache_root or default_cache_root(job))
        indexes = index_source(data, job.task)
        if isinstance(data, FolderData) and data.partition is not None:
            from medfed.data.partition import partition_splits

            (pooled,) = indexes
            whole = reading.site(pooled, -1, "the data set")
            sites = [
                reading.named(site) for site in
                partition_splits({s: whole.split(s) for s in SPLITS}, data.partition, job.task, job.seed)
            ]
        else:
            sites = [reading.site(ix, index.get(ix.name, i)) for i, ix in enumerate(indexes)]
    else:  # pragma: no cover - the schema admits no other source
        raise DataError(f"unsupported data source {type(data).__name__}")
    if job.feature_shift:
        from medfed.data.shift import shift_site

        streamed = [s.name for s in sites if s.name in job.feature_shift and not isinstance(s.train, ArraySplit)]
        if streamed:
            raise DataError(
                f"feature_shift is applied to data held in memory, but site(s) {streamed} stream their files "
                "(data.cache none or disk, or auto for a large site); set data.cache: memory for them"
            )

        sites = [
            shift_site(s, job.feature_shift[s.name], job.seed, index[s.name]) if s.name in job.feature_shift else s
            for s in sites
        ]
    from medfed.data.labels import apply_label_rules, needs_label_rules

    if label_rules and needs_label_rules(job):  # unlabeled examples, hidden labels (data/labels.py)
        sites = apply_label_rules(sites, job, index)
    for site in sites:
        check_site(site, job.task)
    return sites


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


def _check_targets(split: ArraySplit, where: str) -> None:
    """Reconstruction: one-channel 2D images, and ground-truth images of their shape; or a
    k-space network's packed input (data/kspace_input.py) and ground truth of its window."""
    y = split.labels
    if is_packed(split.images):
        n, _, height, width = split.images.shape
        h, w = window_size(split.images) if n else (height, width)
        if not y.dtype.is_floating_point or tuple(y.shape) != (n, 1, h, w):
            raise DataError(f"{where}: ground-truth images must be float (N, 1, h, w) of the k-space input's window "
                            f"{(n, 1, h, w)}, got {y.dtype} {tuple(y.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{where}: ground-truth images hold NaN or Inf")
        return
    if split.images.ndim != 4 or split.images.shape[1] != 1:
        raise DataError(f"{where}: reconstruction takes 1-channel 2D images (N, 1, H, W), got {tuple(split.images.shape)}")
    if not y.dtype.is_floating_point or tuple(y.shape) != tuple(split.images.shape):
        raise DataError(f"{where}: ground-truth images must be float of the inputs' shape "
                        f"{tuple(split.images.shape)}, got {y.dtype} {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise DataError(f"{where}: ground-truth images hold NaN or Inf")


def check_site(site: SiteData, task) -> None:
    """A training split that is not empty, images float32 of one shape and finite, labels
    (or masks) valid for ``task``. Raises DataError naming the site and split. A streamed
    split's pixels and masks are checked as each batch is read (data/stream.py); its labels
    here. Val and test may be empty: a site without labeled examples there (data/labels.py)
    is evaluated on nothing."""
    shape = site.train.shape
    for name in SPLITS:
        split = site.split(name)
        where = f"site '{site.name}' {name} split"
        if len(split) == 0:
            if name == "train":
                raise DataError(f"site '{site.name}' has no examples in its {name} split")
            continue
        if split.shape != shape:
            raise DataError(f"{where}: images are {split.shape}, train images are {shape}")
        if not isinstance(split, ArraySplit):
            if split.labels is not None:
                _check_labels(split.labels, task, where)
            continue
        if split.images.dtype != torch.float32:
            raise DataError(f"{where}: images must be float32, got {split.images.dtype}")
        bad = int((~torch.isfinite(split.images)).sum())
        if bad:
            raise DataError(f"{where}: {bad} pixel value(s) are NaN or Inf")
        if task.kind == "segmentation":
            _check_masks(split, task.num_classes, where)
        elif task.kind == "reconstruction":
            _check_targets(split, where)
        else:
            _check_labels(split.labels, task, where)


def class_counts_of(labels: torch.Tensor | None, task, labeled: torch.Tensor | None = None) -> list[int] | None:
    """Classification: examples per class or positives per label. Segmentation: the
    number of examples in which each class appears. None for a streamed segmentation
    split (its masks are not read at start). ``labeled``: which examples count (all when
    None)."""
    if labels is None or task.kind == "reconstruction":  # a reconstruction's targets are images
        return None
    if labeled is not None:  # the labeled examples only: the others hold placeholders
        labels = labels[labeled]
    if task.kind == "segmentation":
        flat = labels.reshape(len(labels), -1) if len(labels) else labels.reshape(0, 1)
        return [int((flat == k).any(dim=1).sum()) for k in range(task.num_classes)]
    from medfed.data.partition import class_counts

    return class_counts(labels, task)


def describe_sites(sites: list[SiteData], task, held_out: list[str] | tuple[str, ...] = ()) -> list[SiteSummary]:
    """Per site, its :class:`~medfed.core.summary.SiteSummary`: split sizes, class counts
    per split (see :func:`class_counts_of`; left out where unknown), the image shape,
    whether it is held out, and the files it skipped, as written to ``sites.json``. Made
    from the labels and the index only: no pixel is read."""
    def counts(site: SiteData) -> dict[str, list[int]]:
        found = {name: class_counts_of(site.split(name).labels, task, site.split(name).labeled) for name in SPLITS}
        return {name: c for name, c in found.items() if c is not None}

    return [
        SiteSummary(
            name=s.name,
            **{name: len(s.split(name)) for name in SPLITS},
            class_counts=counts(s),
            shape=list(s.train.shape),
            held_out=s.name in held_out,
            unlabeled=count_unlabeled(s.train),
            skipped=len(s.skipped),
            skipped_files=tuple(SkippedFile(file=f, reason=why) for f, why in s.skipped),
        )
        for s in sites
    ]
