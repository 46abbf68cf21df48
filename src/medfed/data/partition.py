"""Split one data set into sites: IID, Dirichlet label skew, quantity skew.

Partitioners are pure functions of the labels and a ``numpy.random.Generator``; every
index goes to exactly one site, and each site's indices come back sorted (int64).
:func:`partition_splits` draws the per-site proportions once and applies them to the
train, val and test splits alike, so a site's test population matches its training one.
"""

from __future__ import annotations

import numpy as np
import torch

from medfed.config import PartitionConfig, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData

SPLITS = ("train", "val", "test")


def iid(n: int, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices 0..n-1 among ``n_sites`` sites uniformly at random, sizes differing by at
    most one."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), n_sites)]


def dirichlet_proportions(num_classes: int, n_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(num_classes, n_sites), rows summing to 1: row c is how class c is shared among the
    sites, drawn from Dirichlet(alpha, ..., alpha). Small alpha: strong label skew."""
    return rng.dirichlet(np.full(n_sites, alpha), size=num_classes)


def quantity_proportions(n_sites: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(n_sites,), summing to 1: the share of the data each site gets, ~ Dirichlet(alpha)."""
    return rng.dirichlet(np.full(n_sites, alpha))


def cut(index: np.ndarray, props: np.ndarray) -> list[np.ndarray]:
    """Cut ``index`` into ``len(props)`` consecutive pieces, piece i holding about
    ``props[i] * len(index)`` entries (rounded at the cumulative boundaries, so the
    pieces always add up to the whole)."""
    bounds = np.round(np.cumsum(props) * len(index)).astype(np.int64)
    bounds = np.clip(bounds, 0, len(index))
    bounds[-1] = len(index)
    return np.split(index, bounds[:-1])


def quantity(n: int, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices 0..n-1, shuffled, cut among sites by ``shares`` (n_sites,) summing to 1
    (e.g. from :func:`quantity_proportions`): sizes skewed, labels IID."""
    return [np.sort(p) for p in cut(rng.permutation(n), shares)]


def split_by_proportions(labels: np.ndarray, props: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``labels`` (n,) among sites: each class c's indices, shuffled, are cut by
    row c of ``props`` (num_classes, n_sites). Labels must be in 0..num_classes-1."""
    labels = np.asarray(labels)
    num_classes, n_sites = props.shape
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"partition labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for site, piece in enumerate(cut(idx, props[c])):
            parts[site].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def partition_class(labels: torch.Tensor, task: TaskConfig) -> tuple[np.ndarray, int]:
    """(N,) the class each example is partitioned by, and how many such classes there are.

    Binary and multi-class: the label itself. Multi-label (N, K): the first positive label,
    or the extra class K for an example with no positive label.
    """
    if task.labels != "multilabel":
        return labels.numpy(), task.num_classes
    y = labels.numpy() > 0.5
    first = np.where(y.any(1), y.argmax(1), task.num_classes)
    return first, task.num_classes + 1


def class_counts(labels: torch.Tensor, task: TaskConfig) -> list[int]:
    """Examples per class (binary, multi-class: ``num_classes`` entries) or positives per
    label (multi-label: K entries)."""
    if task.labels == "multilabel":
        return [int(round(v)) for v in labels.sum(0).tolist()]
    return [int(v) for v in torch.bincount(labels, minlength=task.num_classes).tolist()]


def partition_splits(
    splits: dict[str, ArraySplit], cfg: PartitionConfig, task: TaskConfig, seed: int
) -> list[SiteData]:
    """Split ``splits`` (keys train, val, test) among ``cfg.sites``, in that order.

    The per-site proportions (per class for ``dirichlet``, per site for ``quantity``) are
    drawn once from ``default_rng([seed, 7919])`` and applied to every split. Raises
    DataError naming the site and split when a site would get no examples.
    """
    rng = np.random.default_rng([seed, 7919])
    n_sites = len(cfg.sites)
    if cfg.method == "dirichlet":
        props = dirichlet_proportions(partition_class(splits["train"].labels, task)[1], n_sites, cfg.alpha, rng)
    elif cfg.method == "quantity":
        shares = quantity_proportions(n_sites, cfg.alpha, rng)
    per_split: dict[str, list[np.ndarray]] = {}
    for name in SPLITS:
        data = splits[name]
        if cfg.method == "iid":
            per_split[name] = iid(len(data), n_sites, rng)
        elif cfg.method == "dirichlet":
            per_split[name] = split_by_proportions(partition_class(data.labels, task)[0], props, rng)
        else:
            per_split[name] = quantity(len(data), shares, rng)

    for i, site in enumerate(cfg.sites):
        for name in SPLITS:
            if len(per_split[name][i]) == 0:
                how = "" if cfg.method == "iid" else f", alpha={cfg.alpha:g}"
                hint = "use fewer sites" if cfg.method == "iid" else "use a larger alpha or fewer sites"
                raise DataError(
                    f"site '{site}' receives no examples in its {name} split ({len(splits[name])} "
                    f"examples among {n_sites} sites, partition '{cfg.method}'{how}); {hint}"
                )
    return [
        SiteData(site, *(splits[name].subset(torch.from_numpy(per_split[name][i])) for name in SPLITS))
        for i, site in enumerate(cfg.sites)
    ]
