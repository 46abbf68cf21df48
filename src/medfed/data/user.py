"""Sites from the user's own PyTorch datasets (``medfed.run(..., datasets=...)``).

Each split is read once, item by item, into an :class:`~medfed.data.base.ArraySplit`:
an item must be an ``(image, target)`` pair, the image float-convertible of shape
(C, H, W) or (C, D, H, W), the same for every item of the site; the target a class index,
a 0/1 vector (multi-label) or, for segmentation, a mask of class indices of the image's
spatial shape (a leading channel of one is dropped). Every error names the site, the
split and the item's index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from medfed.core.errors import DataError
from medfed.data.assemble import SPLITS
from medfed.data.base import ArraySplit, SiteData

# site name -> "train" | "val" | "test" -> a map-style dataset of (image, target) items
# (an iterable dataset is read by iterating it)
UserSplits = Mapping[str, Dataset]
UserDatasets = Mapping[str, UserSplits]


def _items(ds: Dataset, where: str) -> Iterator[object]:
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        for i in range(len(ds)):  # type: ignore[arg-type]
            yield ds[i]  # type: ignore[index]
    elif hasattr(ds, "__iter__"):
        yield from ds  # type: ignore[misc]
    else:
        raise DataError(f"{where}: expected a PyTorch Dataset (with __len__ and __getitem__) or an iterable of "
                        f"(image, target) pairs, got {type(ds).__name__}")


def _as_array(value: object, what: str, where: str) -> np.ndarray:
    try:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)
    except Exception as e:  # anything the user's dataset yields
        raise DataError(f"{where}: the {what} cannot be read as an array ({type(value).__name__}): {e}") from None


def _target(value: object, task, spatial: tuple[int, ...], where: str) -> np.ndarray:
    t = _as_array(value, "target", where)
    if task.kind == "segmentation":
        if t.shape == (1, *spatial):
            t = t[0]
        if t.shape != spatial:
            raise DataError(f"{where}: the mask must have the image's spatial shape {spatial}, got {t.shape}")
        if not np.all(np.isfinite(t)) or not np.all(t == np.round(t)):
            raise DataError(f"{where}: the mask must hold class indices (whole numbers)")
        return t.astype(np.int64)
    if task.labels == "multilabel":
        if t.shape != (task.num_classes,):
            raise DataError(
                f"{where}: a multi-label target must be a 0/1 vector of {task.num_classes}, got shape {t.shape}"
            )
        return t.astype(np.float32)
    if t.size != 1 or not np.isfinite(t).all() or float(t.reshape(())) != int(t.reshape(())):
        raise DataError(f"{where}: the target must be one class index (a whole number), got shape {t.shape} {t.dtype}")
    return np.asarray(int(t.reshape(())), dtype=np.int64)


def read_split(ds: Dataset, task, site: str, split: str, shape: tuple[int, ...] | None) -> ArraySplit:
    """One user dataset as an ArraySplit; ``shape``: the (C, *spatial) its images must
    have (the site's train images'), None to take the first item's."""
    images, targets = [], []
    for i, item in enumerate(_items(ds, f"site '{site}' {split} dataset")):
        where = f"site '{site}' {split} dataset, item {i}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
            raise DataError(f"{where}: each item must be an (image, target) pair, got {got}")
        image = _as_array(item[0], "image", where)
        if image.dtype == object or not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
            raise DataError(f"{where}: the image must hold numbers, got {image.dtype}")
        if image.ndim not in (3, 4):
            raise DataError(f"{where}: the image must have shape (C, H, W) or (C, D, H, W), got {image.shape}")
        if shape is None:
            shape = tuple(image.shape)
        if tuple(image.shape) != shape:
            raise DataError(f"{where}: the image has shape {image.shape}, but the site's images are {shape}")
        images.append(image.astype(np.float32))
        targets.append(_target(item[1], task, shape[1:], where))
    if not images:
        raise DataError(f"site '{site}' {split} dataset is empty")
    return ArraySplit(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets)))


def user_sites(datasets: UserDatasets, site_names: list[str], task) -> list[SiteData]:
    """The job's sites, in its order, from ``datasets`` (site name -> {"train", "val",
    "test"} -> dataset). A site of the job missing from it, a key that is not a site of
    the job or a split missing are DataErrors naming them."""
    unknown = [k for k in datasets if k not in site_names]
    if unknown:
        raise DataError(f"datasets: {unknown} not a site of the job; its sites are {site_names}")
    missing = [n for n in site_names if n not in datasets]
    if missing:
        raise DataError(f"datasets: no data for the job's site(s) {missing}; give each {{'train', 'val', 'test'}}")
    sites = []
    for name in site_names:
        splits = datasets[name]
        if not isinstance(splits, Mapping) or set(splits) != set(SPLITS):
            got = sorted(splits) if isinstance(splits, Mapping) else type(splits).__name__
            raise DataError(f"datasets['{name}']: must map 'train', 'val' and 'test' to datasets, got {got}")
        train = read_split(splits["train"], task, name, "train", None)
        sites.append(SiteData(
            name=name, train=train,
            val=read_split(splits["val"], task, name, "val", train.shape),
            test=read_split(splits["test"], task, name, "test", train.shape),
        ))
    return sites
