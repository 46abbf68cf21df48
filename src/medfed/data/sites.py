"""Build and check every site's data for a job."""

from __future__ import annotations

import torch

from medfed.config import Job, MedMNISTData, SyntheticData, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import SiteData
from medfed.data.partition import class_counts


def build_sites(job: Job) -> list[SiteData]:
    """The sites of ``job``, in the job's order, checked against its task."""
    if isinstance(job.data, SyntheticData):
        if job.task.labels != "binary":
            raise DataError(
                f"synthetic data is binary (lesion absent/present) but task.labels is '{job.task.labels}'"
            )
        from medfed.data.synthetic import make_synthetic_sites

        sites = make_synthetic_sites(job.data, job.seed)
    elif isinstance(job.data, MedMNISTData):
        from medfed.data.medmnist import load_medmnist
        from medfed.data.partition import partition_splits

        sites = partition_splits(load_medmnist(job.data.path, job.task), job.data.partition, job.task, job.seed)
    else:  # pragma: no cover - the schema admits no other source
        raise DataError(f"unsupported data source {type(job.data).__name__}")
    for site in sites:
        check_site(site, job.task)
    return sites


def check_site(site: SiteData, task: TaskConfig) -> None:
    """Every split non-empty, images finite, labels valid for the task."""
    shape = tuple(site.train.images.shape[1:])
    for name in ("train", "val", "test"):
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
        y = split.labels
        if task.labels == "multilabel":
            if y.ndim != 2 or y.shape[1] != task.num_classes:
                raise DataError(f"{where}: labels must have shape (N, {task.num_classes}), got {tuple(y.shape)}")
        elif y.ndim != 1 or y.dtype != torch.int64 or int(y.min()) < 0 or int(y.max()) >= task.num_classes:
            raise DataError(f"{where}: labels must be int64 class indices in 0..{task.num_classes - 1}")


def describe_sites(sites: list[SiteData], task: TaskConfig) -> list[dict]:
    """Sizes and class counts per site and split, as written to ``sites.json``."""
    return [
        {
            "name": s.name,
            **{name: len(s.split(name)) for name in ("train", "val", "test")},
            "class_counts": {name: class_counts(s.split(name).labels, task) for name in ("train", "val", "test")},
        }
        for s in sites
    ]
