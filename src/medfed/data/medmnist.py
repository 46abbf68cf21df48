"""MedMNIST ``.npz`` reader (2D), with the official train/val/test split.

Images: uint8 (N, H, W) for one channel or (N, H, W, 3) for RGB; float arrays are
accepted if finite. Labels: (N,) or (N, 1) class indices for binary and multi-class
tasks, (N, K) 0/1 for multi-label tasks.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from medfed.config import TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit

SPLITS = ("train", "val", "test")


def _images(arr: np.ndarray, where: str) -> torch.Tensor:
    if arr.dtype.kind not in "uif":
        raise DataError(f"{where}: images must be numeric (uint8 or float), got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = np.moveaxis(arr, -1, 1)
    else:
        raise DataError(f"{where}: images must have shape (N, H, W) or (N, H, W, 1|3), got {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{where}: the split is empty")
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
    out = arr.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise DataError(f"{where}: {bad} pixel value(s) are NaN or Inf")
    return torch.from_numpy(np.ascontiguousarray(out))


def _labels(arr: np.ndarray, task: TaskConfig, where: str) -> torch.Tensor:
    if arr.dtype.kind not in "uifb":
        raise DataError(f"{where}: labels must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{where}: labels hold NaN or Inf")
    if task.labels == "multilabel":
        if arr.ndim != 2 or arr.shape[1] != task.num_classes:
            raise DataError(f"{where}: multi-label labels must have shape (N, {task.num_classes}), got {arr.shape}")
        bad = arr[(arr != 0) & (arr != 1)]
        if bad.size:
            raise DataError(f"{where}: multi-label labels must be 0 or 1, found {bad.flat[0].item()!r}")
        return torch.from_numpy(arr.astype(np.float32))
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must have shape (N,) or (N, 1), got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise DataError(f"{where}: class labels must be whole numbers")
    bad = arr[(arr < 0) | (arr >= task.num_classes)]
    if bad.size:
        raise DataError(
            f"{where}: label {bad.flat[0].item()!r} is outside 0..{task.num_classes - 1} (task.num_classes={task.num_classes})"
        )
    return torch.from_numpy(arr.astype(np.int64))


def load_medmnist(path: Path, task: TaskConfig) -> dict[str, ArraySplit]:
    """The ``train``, ``val`` and ``test`` splits of a MedMNIST ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MedMNIST file '{path}' not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            need = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
            missing = [k for k in need if k not in keys]
            if missing:
                raise DataError(f"'{path}': missing key(s) {missing}; found {sorted(keys)}")
            raw = {k: npz[k] for k in need}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"'{path}' is not a readable .npz file ({type(e).__name__}: {e})") from None
    out: dict[str, ArraySplit] = {}
    for s in SPLITS:
        images = _images(raw[f"{s}_images"], f"'{path}' key '{s}_images'")
        labels = _labels(raw[f"{s}_labels"], task, f"'{path}' key '{s}_labels'")
        if len(labels) != len(images):
            raise DataError(f"'{path}': {len(images)} images in '{s}_images' but {len(labels)} labels in '{s}_labels'")
        out[s] = ArraySplit(images, labels)
    return out
