"""MedMNIST ``.npz`` reader (2D and 3D), with the official train/val/test split.

The file holds ``{split}_images`` and ``{split}_labels`` for split in train, val, test.
Images with ``dims=2``: uint8 (N, H, W) for one channel or (N, H, W, 3) for RGB
((N, H, W, 1) is read as one channel), returned (N, C, H, W). With ``dims=3`` (the 3D
sets such as OrganMNIST3D): (N, D, H, W) or (N, D, H, W, 1) volumes, returned
(N, 1, D, H, W). An array of the other kind is an error that says which ``dims`` to
set. uint8 is divided by 255; float arrays are taken as they are if finite, other
integer arrays if they hold 0..255. Labels: (N,) or (N, 1) class indices for binary and multi-class tasks,
(N, K) 0/1 for multi-label tasks with K labels. Nothing is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from medfed.config import TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))

# What np.load and the zip reader raise on a damaged or truncated archive (an unknown
# compression method, an encrypted member, a header claiming a huge array included).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, NotImplementedError,
                RuntimeError, MemoryError, UnicodeDecodeError, SyntaxError, TypeError, struct.error)


def _read(path: Path) -> dict[str, np.ndarray]:
    """The six arrays of the file, read eagerly; DataError names the file and key."""
    if not path.is_file():
        raise DataError(f"MedMNIST file '{path}' not found")
    if not zipfile.is_zipfile(path):
        raise DataError(f"MedMNIST file '{path}' is not a .npz (zip) archive; it may be truncated or corrupt")
    try:
        npz = np.load(path, allow_pickle=False)
    except _READ_ERRORS as e:
        raise DataError(f"MedMNIST file '{path}' cannot be read ({type(e).__name__}: {e})") from None
    with npz:
        found = sorted(npz.files)
        missing = [k for k in KEYS if k not in found]
        if missing:
            raise DataError(f"MedMNIST file '{path}': missing key(s) {missing}; found {found}")
        out = {}
        for key in KEYS:
            try:
                out[key] = npz[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise DataError(
                        f"MedMNIST file '{path}' key '{key}': holds Python objects (dtype object), "
                        "which are never unpickled; store numeric arrays"
                    ) from None
                raise DataError(f"MedMNIST file '{path}' key '{key}': cannot be read ({e})") from None
            except _READ_ERRORS as e:
                raise DataError(
                    f"MedMNIST file '{path}' key '{key}': cannot be read, the file may be corrupt "
                    f"({type(e).__name__}: {e})"
                ) from None
    return out


def _layout(arr: np.ndarray, dims: int, where: str) -> np.ndarray:
    """Channels-first images: (N, C, H, W) for ``dims=2``, (N, 1, D, H, W) for ``dims=3``."""
    channels_last = arr.ndim == 4 and arr.shape[-1] in (1, 3) and min(arr.shape[1:3]) > 3
    if dims == 2:
        if arr.ndim == 3:
            return arr[:, None]
        if arr.ndim == 4 and arr.shape[-1] in (1, 3):
            return np.moveaxis(arr, -1, 1)
        if arr.ndim in (4, 5):
            raise DataError(f"{where}: images of shape {arr.shape} look like 3D volumes (N, D, H, W); set data.dims: 3")
        raise DataError(f"{where}: images must have shape (N, H, W) or (N, H, W, 1|3), got {arr.shape}")
    if arr.ndim == 5 and arr.shape[-1] == 1:
        return np.moveaxis(arr, -1, 1)
    if arr.ndim == 4 and not channels_last:
        return arr[:, None]
    if arr.ndim == 3 or channels_last:
        raise DataError(f"{where}: images of shape {arr.shape} look like 2D images (N, H, W[, C]); set data.dims: 2")
    raise DataError(f"{where}: 3D images must have shape (N, D, H, W) or (N, D, H, W, 1), got {arr.shape}")


def _images(arr: np.ndarray, dims: int, where: str) -> torch.Tensor:
    """(N, C, H, W) or (N, 1, D, H, W) float32; uint8 scaled to [0, 1]."""
    if arr.dtype.kind not in "uif":
        raise DataError(f"{where}: images must be uint8 or float, got dtype {arr.dtype}")
    arr = _layout(arr, dims, where)
    if arr.shape[0] == 0:
        raise DataError(f"{where}: the split is empty")
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must hold 0..255 like uint8, found values in {lo}..{hi}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).div_(255.0)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise DataError(f"{where}: {bad} pixel value(s) are NaN or Inf")
    return torch.from_numpy(out)


def _labels(arr: np.ndarray, task: TaskConfig, where: str) -> torch.Tensor:
    """(N,) int64 class indices, or (N, K) float32 0/1 for a multi-label task."""
    if arr.dtype.kind not in "uifb":
        raise DataError(f"{where}: labels must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{where}: {int(np.count_nonzero(~np.isfinite(arr)))} label(s) are NaN or Inf")
    if task.labels == "multilabel":
        if arr.ndim != 2 or arr.shape[1] != task.num_classes:
            raise DataError(
                f"{where}: multi-label labels must have shape (N, {task.num_classes}) "
                f"(task.num_classes), got {arr.shape}"
            )
        bad = arr[(arr != 0) & (arr != 1)]
        if bad.size:
            raise DataError(f"{where}: multi-label labels must be 0 or 1, found {bad.flat[0].item()!r}")
        return torch.from_numpy(arr.astype(np.float32))
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{where}: {task.labels} labels must have shape (N,) or (N, 1), got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        bad = arr[arr != np.round(arr)]
        raise DataError(f"{where}: class labels must be whole numbers, found {bad.flat[0].item()!r}")
    bad = arr[(arr < 0) | (arr >= task.num_classes)]
    if bad.size:
        raise DataError(
            f"{where}: label {bad.flat[0].item()!r} is outside 0..{task.num_classes - 1} "
            f"({task.labels} task with num_classes={task.num_classes})"
        )
    return torch.from_numpy(arr.astype(np.int64))


def load_medmnist(path: Path, task: TaskConfig, dims: int = 2) -> dict[str, ArraySplit]:
    """The ``train``, ``val`` and ``test`` splits of a MedMNIST ``.npz`` file.

    Images come back float32 (uint8 / 255), (N, C, H, W) for ``dims=2`` and
    (N, 1, D, H, W) for ``dims=3``; labels as :class:`ArraySplit` describes. Raises DataError naming the file and key for a missing, corrupt or
    malformed file, and for labels that do not fit ``task``.
    """
    path = Path(path)
    if dims not in (2, 3):
        raise DataError(f"MedMNIST file '{path}': dims must be 2 or 3, got {dims!r}")
    raw = _read(path)
    out: dict[str, ArraySplit] = {}
    for s in SPLITS:
        images = _images(raw[f"{s}_images"], dims, f"MedMNIST file '{path}' key '{s}_images'")
        labels = _labels(raw[f"{s}_labels"], task, f"MedMNIST file '{path}' key '{s}_labels'")
        if len(labels) != len(images):
            raise DataError(
                f"MedMNIST file '{path}': {len(images)} images in '{s}_images' but "
                f"{len(labels)} labels in '{s}_labels'"
            )
        out[s] = ArraySplit(images, labels)
    shapes = {s: tuple(out[s].images.shape[1:]) for s in SPLITS}
    if len(set(shapes.values())) > 1:
        raise DataError(f"MedMNIST file '{path}': image shapes differ between splits, (C, *spatial) = {shapes}")
    return out
