"""Split one data set into sites: IID, Dirichlet label skew, quantity skew.

Partitioners are pure functions of the labels and a ``numpy.random.Generator``; every
index goes to exactly one site, and each site's indices are returned sorted.
"""

from __future__ import annotations

import numpy as np
import torch

from medfed.config import PartitionConfig, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData


def iid(n: int, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly at random, sizes differing by at most one."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), n_sites)]


def dirichlet_proportions(num_classes: int, n_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(num_classes, n_sites): row c is how class c is shared among sites, ~ Dir(alpha)."""
    return rng.dirichlet(np.full(n_sites, alpha), size=num_classes)


def quantity_proportions(n_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(n_sites,): the share of the data each site gets, ~ Dir(alpha)."""
    return rng.dirichlet(np.full(n_sites, alpha))


def _cut(index: np.ndarray, props: np.ndarray) -> list[np.ndarray]:
    """Cut ``index`` into consecutive pieces of sizes proportional to ``props``."""
    bounds = np.round(np.cumsum(props) * len(index)).astype(int)
    bounds[-1] = len(index)
    return np.split(index, bounds[:-1])


def split_by_proportions(labels: np.ndarray, props: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's indices, shuffled, cut among sites by its row of ``props``."""
    n_sites = props.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in range(props.shape[0]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for site, piece in enumerate(_cut(idx, props[c])):
            parts[site].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def partition_class(labels: torch.Tensor, task: TaskConfig) -> tuple[np.ndarray, int]:
    """The class used to partition each example, and the number of such classes.

    Multi-label examples use their first positive label, or an extra class for none.
    """
    if task.labels != "multilabel":
        return labels.numpy(), task.num_classes
    y = labels.numpy() > 0.5
    first = np.where(y.any(1), y.argmax(1), task.num_classes)
    return first, task.num_classes + 1


def class_counts(labels: torch.Tensor, task: TaskConfig) -> list[int]:
    """Examples per class (binary, multi-class) or positives per label (multi-label)."""
    if task.labels == "multilabel":
        return [int(v) for v in labels.sum(0).tolist()]
    return [int(v) for v in torch.bincount(labels, minlength=task.num_classes).tolist()]


def partition_splits(
    splits: dict[str, ArraySplit], cfg: PartitionConfig, task: TaskConfig, seed: int
) -> list[SiteData]:
    """Split train, val and test among ``cfg.sites`` with proportions drawn once, so that
    each site's val and test populations match its training population."""
    rng = np.random.default_rng([seed, 7919])
    n_sites = len(cfg.sites)
    per_split: dict[str, list[np.ndarray]] = {}
    if cfg.method == "dirichlet":
        _, k = partition_class(splits["train"].labels, task)
        props = dirichlet_proportions(k, n_sites, cfg.alpha, rng)
    elif cfg.method == "quantity":
        shares = quantity_proportions(n_sites, cfg.alpha, rng)
    for name, data in splits.items():
        if cfg.method == "iid":
            per_split[name] = iid(len(data), n_sites, rng)
        elif cfg.method == "dirichlet":
            per_split[name] = split_by_proportions(partition_class(data.labels, task)[0], props, rng)
        else:
            per_split[name] = [np.sort(p) for p in _cut(rng.permutation(len(data)), shares)]
    sites = []
    for i, site in enumerate(cfg.sites):
        for name, parts in per_split.items():
            if len(parts[i]) == 0:
                raise DataError(
                    f"site '{site}' receives no examples in its {name} split with partition "
                    f"'{cfg.method}' (alpha={cfg.alpha:g}); use a larger alpha or fewer sites"
                )
        sites.append(
            SiteData(
                name=site,
                **{name: splits[name].subset(torch.from_numpy(per_split[name][i])) for name in ("train", "val", "test")},
            )
        )
    return sites
