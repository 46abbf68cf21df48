"""Volumes cut into 2D slices, for a reconstruction job over ``source: volumes``.

The volumes are read, preprocessed (``spacing``, ``resize``, ... in 3D) and drawn into
train, val and test as the volumes source does it for its own task, volume by volume, so
one patient's slices never fall into two splits (data/sites.py reads them with the
segmentation task of data/kspace.py ``image_source_task``; their label volumes are read
and dropped). Then each split's volumes are cut along one array axis
(``task.slice_axis``, default :func:`slice_axis`) into 2D slices (1, H, W), each named
``<volume>#<index along the axis>``. A constant slice (its maximum equals its minimum, e.g.
all zero outside the body or in a resampling's padding) holds nothing to reconstruct and
would score an undefined NMSE: it is left out, and the count is logged. The slices then
become ground truth like any other 2D image (data/kspace.py ``reconstruction_sites``).
"""

from __future__ import annotations

import logging

import torch

from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData
from medfed.data.kspace import SPLIT_INDEX, in_memory

log = logging.getLogger("medfed")


def slice_axis(task, data) -> int:
    """The array axis (0, 1, 2) along which ``data``'s volumes are cut: ``task.slice_axis``
    when set, else the last axis for NIfTI (axial for files in RAS or LPS order) and the
    first for DICOM, whose volumes are (slice, row, column)."""
    axis = getattr(task, "slice_axis", None)
    if axis is not None:
        return int(axis)
    return 0 if getattr(data, "format", "nifti") == "dicom" else 2


def split_slices(split: ArraySplit, axis: int, where: str) -> tuple[ArraySplit, int]:
    """The non-constant 2D slices (M, 1, H, W) of a split of volumes (N, 1, D0, D1, D2) cut
    along spatial ``axis``, volume by volume in order, with placeholder labels (the
    reconstruction's targets are the slices themselves) and their names; and how many
    constant slices were left out."""
    images = split.images
    if images.ndim != 5 or images.shape[1] != 1:
        raise DataError(f"{where}: reconstruction cuts grey volumes (N, 1, D, H, W) into slices, got "
                        f"{tuple(images.shape)}")
    if not 0 <= axis <= 2:
        raise DataError(f"task.slice_axis: a volume has the array axes 0, 1 and 2, got {axis}")
    names = split.names or tuple(f"volume {i}" for i in range(len(images)))
    kept: list[torch.Tensor] = []
    kept_names: list[str] = []
    empty = 0
    for volume, name in zip(images[:, 0], names):
        slices = volume.movedim(axis, 0)  # (S, H, W)
        flat = slices.flatten(1)
        varies = flat.amax(1) > flat.amin(1)
        empty += int((~varies).sum())
        index = torch.nonzero(varies).flatten()
        kept.append(slices[index])
        kept_names.extend(f"{name}#{int(k)}" for k in index)
    height, width = (int(n) for n in images.shape[2:][:axis] + images.shape[2:][axis + 1:])
    out = torch.cat(kept) if kept else torch.zeros(0, height, width)
    return ArraySplit(out[:, None].contiguous(), torch.zeros(len(out), dtype=torch.int64), tuple(kept_names)), empty


def slice_site(site: SiteData, axis: int) -> SiteData:
    """``site``'s splits of volumes, each cut into its 2D slices (:func:`split_slices`).
    A DataError naming the site and split when the site streams its files, or when a split
    that holds volumes keeps no slice."""
    parts = {}
    for split in SPLIT_INDEX:
        where = f"site '{site.name}' {split} split"
        volumes = in_memory(site.split(split), where)
        parts[split], empty = split_slices(volumes, axis, where)
        if len(volumes) and not len(parts[split]):
            raise DataError(f"{where}: every slice of its {len(volumes)} volume(s) along axis {axis} is constant "
                            "(nothing to reconstruct); check the volumes, or choose another task.slice_axis")
        if empty:
            log.info("%s: %d constant slice(s) along axis %d left out (nothing to reconstruct), %d kept",
                     where, empty, axis, len(parts[split]))
    return SiteData(site.name, parts["train"], parts["val"], parts["test"], site.skipped)


def slice_sites(sites: list[SiteData], task, data) -> list[SiteData]:
    """Every site of a volumes source cut into 2D slices along :func:`slice_axis`."""
    axis = slice_axis(task, data)
    return [slice_site(site, axis) for site in sites]
