"""fastMRI single-coil HDF5 files (``source: fastmri``), for the reconstruction task.

A file holds ``kspace`` (slices, H, W) complex, fully sampled, and the ground truth
``reconstruction_esc`` or ``reconstruction_rss`` (slices, h, w), real; it is read whole
with MONAI's ``FastMRIReader`` (h5py). Each slice's k-space is undersampled by the task's
mask (data/kspace.py, the slice's seed from its position in the site's split), brought back
by the inverse FFT, centre-cropped to the ground truth's h x w (MONAI ``CenterSpatialCrop``),
and both are divided by the ground truth's maximum of that slice, so that it lies in
[0, 1]. A split's files are read in name order.

For a network that reads k-space (``varnet``) the input is the file's own k-space, divided
by that maximum and undersampled by the same masks, whole (its field of view, not cropped),
packed with its zero-filled magnitude, its mask and the ground truth's centred window
(data/kspace_input.py): the network crops its output to the window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medfed.config import FastMRIData, ReconstructionTaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData
from medfed.data.kspace import check_even, example_seeds, undersample, undersample_packed

SPLITS = ("train", "val", "test")


def read_fastmri_file(path: Path, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-space (slices, H, W, 2) float32 and the ground truth (slices, h, w) float32 of
    one single-coil fastMRI file. DataError naming the file when it cannot be read, lacks
    ``kspace`` or ``target``, or holds multi-coil or mismatched arrays."""
    try:
        from monai.apps.reconstruction.fastmri_reader import FastMRIReader
        import h5py  # noqa: F401  FastMRIReader's own dependency: named in the error below when missing
    except ImportError:
        raise DataError('data.source: fastmri reads HDF5 files with h5py; install it (pip install -e ".[fastmri]")') from None
    try:
        dat = FastMRIReader().read(str(path))
    except OSError as e:
        raise DataError(f"fastMRI file '{path}': not a readable HDF5 file ({e})") from None
    if "kspace" not in dat:
        raise DataError(f"fastMRI file '{path}': has no 'kspace' dataset (it has {sorted(k for k in dat if k != 'filename')}); "
                        "a fastMRI file holds the fully sampled k-space under 'kspace'")
    if target not in dat:
        have = sorted(k for k in dat if str(k).startswith("reconstruction"))
        raise DataError(f"fastMRI file '{path}': has no '{target}' (data.target); it has {have or 'no ground truth'}")
    kspace, truth = np.asarray(dat["kspace"]), np.asarray(dat[target])
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise DataError(f"fastMRI file '{path}': kspace must be complex (slices, H, W) (single-coil), got "
                        f"{kspace.dtype} {kspace.shape}; multi-coil files are not read yet")
    if truth.ndim != 3 or len(truth) != len(kspace):
        raise DataError(f"fastMRI file '{path}': {target} must be (slices, h, w) with the {len(kspace)} slices of "
                        f"kspace, got {truth.shape}")
    if truth.shape[1] > kspace.shape[1] or truth.shape[2] > kspace.shape[2]:
        raise DataError(f"fastMRI file '{path}': {target} is {truth.shape[1]}x{truth.shape[2]}, larger than its "
                        f"k-space {kspace.shape[1]}x{kspace.shape[2]}")
    check_even(kspace.shape[1:], f"fastMRI file '{path}': k-space")
    ks = torch.view_as_real(torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64)))
    return ks, torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))


def fastmri_split(
    files: list[Path], target: str, task: ReconstructionTaskConfig, acceleration: float, seed: int, site_index: int,
    split: str, packed: bool = False,
) -> ArraySplit:
    """The slices of ``files``: zero-filled inputs and ground truth (N, 1, h, w), scaled
    (``packed``: the packed k-space inputs (N, 5, H, W) of a k-space network)."""
    from monai.transforms import CenterSpatialCrop

    images, truths, names = [], [], []
    start = 0
    for path in files:
        kspace, truth = read_fastmri_file(path, target)
        n = len(kspace)
        seeds = example_seeds(seed, site_index, split, start + n)[start:]
        if packed:
            peak = truth.flatten(1).amax(1).clamp_min(1e-12)
            scaled = kspace / peak[:, None, None, None]
            images.append(undersample_packed(scaled, acceleration, task.center_fraction, task.mask, seeds,
                                             tuple(truth.shape[1:])))
            truths.append(truth / peak[:, None, None])
            names += [f"{path.name}#{i}" for i in range(n)]
            start += n
            continue
        zf = undersample(kspace, acceleration, task.center_fraction, task.mask, seeds)
        zf = torch.as_tensor(CenterSpatialCrop(roi_size=tuple(truth.shape[1:]))(zf))
        if tuple(zf.shape) != tuple(truth.shape):
            raise DataError(f"fastMRI file '{path}': cropped inputs {tuple(zf.shape)} do not match {target} {tuple(truth.shape)}")
        peak = truth.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        images.append(zf / peak)
        truths.append(truth / peak)
        names += [f"{path.name}#{i}" for i in range(n)]
        start += n
    if not images:
        raise DataError(f"no fastMRI slices for the {split} split")
    shapes = {tuple(t.shape[1:]) for t in truths}
    if len(shapes) > 1:
        raise DataError(f"{split} split: the ground truth of the files has sizes {sorted(shapes)}; one size a site "
                        "is needed for now")
    if packed:
        fields = {tuple(x.shape[2:]) for x in images}
        if len(fields) > 1:
            raise DataError(f"{split} split: the k-space of the files has sizes {sorted(fields)}; one size a site "
                            "is needed for now")
        return ArraySplit(torch.cat(images), torch.cat(truths)[:, None].float(), tuple(names))
    return ArraySplit(torch.cat(images)[:, None].float(), torch.cat(truths)[:, None].float(), tuple(names))


def make_fastmri_sites(cfg: FastMRIData, task: ReconstructionTaskConfig, seed: int, packed: bool = False) -> list[SiteData]:
    """One reconstruction site per configured site, in the job's order, each split from the
    ``.h5`` files of its folder (a folder without any is an error naming it); ``packed`` for
    a k-space network."""
    sites = []
    for i, s in enumerate(cfg.sites):
        acceleration = s.acceleration if s.acceleration is not None else task.acceleration
        splits = {}
        for split in SPLITS:
            folder = Path(getattr(s, split))
            files = sorted(folder.glob("*.h5")) if folder.is_dir() else []
            if not files:
                raise DataError(f"site '{s.name}': data.sites[{i}].{split} '{folder}' holds no .h5 fastMRI files")
            try:
                splits[split] = fastmri_split(files, cfg.target, task, acceleration, seed, i, split, packed)
            except DataError as e:
                raise DataError(f"site '{s.name}': {e}") from None
        sites.append(SiteData(name=s.name, **splits))
    return sites
