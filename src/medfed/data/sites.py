"""Build and check every site's data for a job."""

from __future__ import annotations

import torch

from medfed.config import Job, MedMNISTData, SyntheticData, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import SiteData
from medfed.data.partition import class_counts

SPLITS = ("train", "val", "test")


def build_sites(job: Job) -> list[SiteData]:
    """The sites of ``job``, in the job's order, each checked by :func:`check_site`.

    Synthetic data is generated from ``job.seed``; a MedMNIST file is read and split among
    the sites by ``job.data.partition`` with ``job.seed``. Raises DataError.
    """
    if isinstance(job.data, SyntheticData):
        if job.task.labels != "binary" or job.task.num_classes != 2:
            raise DataError(
                "synthetic data is binary (label 1 = lesion present) but the job's task is "
                f"'{job.task.labels}' with {job.task.num_classes} classes; set task.labels: binary"
            )
        from medfed.data.synthetic import make_synthetic_sites

        sites = make_synthetic_sites(job.data, job.seed)
    elif isinstance(job.data, MedMNISTData):
        from medfed.data.readers.medmnist import load_medmnist
        from medfed.data.partition import partition_splits

        sites = partition_splits(load_medmnist(job.data.path, job.task), job.data.partition, job.task, job.seed)
    else:  # pragma: no cover - the schema admits no other source
        raise DataError(f"unsupported data source {type(job.data).__name__}")
    for site in sites:
        check_site(site, job.task)
    return sites


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


def check_site(site: SiteData, task: TaskConfig) -> None:
    """Every split non-empty, images (N, C, H, W) float32 of one shape and finite, labels
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
        _check_labels(split.labels, task, where)


def describe_sites(sites: list[SiteData], task: TaskConfig) -> list[dict]:
    """Per site: ``name``, the sizes of ``train``, ``val`` and ``test``, and
    ``class_counts`` per split (see :func:`class_counts`), as written to ``sites.json``."""
    return [
        {
            "name": s.name,
            **{name: len(s.split(name)) for name in SPLITS},
            "class_counts": {name: class_counts(s.split(name).labels, task) for name in SPLITS},
        }
        for s in sites
    ]
