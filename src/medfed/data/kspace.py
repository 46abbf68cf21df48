"""Single-coil Cartesian undersampling of magnitude images, for the reconstruction task.

An image (1, H, W) in [0, 1] is taken to k-space by MONAI's centred FFT
(``monai.data.fft_utils.fftn_centered``), multiplied by one of MONAI's k-space masks
(``monai.apps.reconstruction.transforms.array.EquispacedKspaceMask`` or
``RandomKspaceMask``: lines along the last axis, a centred band of ``center_fraction`` of
them always kept, about 1/``acceleration`` kept in all) and brought back by the inverse FFT;
its magnitude is the *zero-filled* image, the network's input. A network that reads k-space
(``varnet``) gets the masked k-space and the mask with it, packed as one tensor
(:func:`undersample_packed`, data/kspace_input.py). Nothing here is written again: the
masks, the FFT and the magnitude are MONAI's.

Each example's mask is drawn from its own seed, ``SeedSequence([job seed, site index,
split index, example index])``, so the zero-filled input of an example is the same in every
arm, every round and every run of the job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData

log = logging.getLogger("medfed")

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_CHUNK = 512  # images transformed at a time


def kspace_mask(kind: str, acceleration: float, center_fraction: float):
    """MONAI's k-space mask transform of ``kind`` (``equispaced`` or ``random``) for 2D
    complex k-space (..., H, W, 2), sampling lines along W. Its ``set_random_state`` fixes
    the draw; after a call, its ``mask`` attribute holds the lines kept (1, ..., W, 1)."""
    from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, RandomKspaceMask

    cls = EquispacedKspaceMask if kind == "equispaced" else RandomKspaceMask
    return cls(center_fractions=[center_fraction], accelerations=[acceleration], spatial_dims=2, is_complex=True)


def to_kspace(image: torch.Tensor) -> torch.Tensor:
    """Centred 2D k-space (..., H, W, 2) (real and imaginary parts last) of real images
    (..., H, W): MONAI's ``fftn_centered``."""
    from monai.data.fft_utils import fftn_centered

    return torch.as_tensor(fftn_centered(torch.stack([image, torch.zeros_like(image)], dim=-1), spatial_dims=2))


def example_seeds(seed: int, site_index: int, split: str, n: int) -> list[int]:
    """The mask seed of each of ``n`` examples of a split: one 32-bit draw of
    ``SeedSequence([seed, site_index, split index, i])`` per example ``i``."""
    return [int(np.random.SeedSequence([seed, site_index, SPLIT_INDEX[split], i]).generate_state(1)[0])
            for i in range(n)]


def draw_masks(width: int, acceleration: float, center_fraction: float, mask: str, seeds: Sequence[int]) -> torch.Tensor:
    """The lines kept (N, W) float32 0/1 of ``len(seeds)`` examples ``width`` lines wide:
    MONAI's mask transform, its random state set from each seed in turn (it draws only from
    the number of lines, so it runs on an empty line of k-space)."""
    transform = kspace_mask(mask, acceleration, center_fraction)
    empty = torch.zeros(1, 1, width, 2)
    out = torch.empty(len(seeds), width)
    for i, s in enumerate(seeds):
        transform.set_random_state(seed=s)
        transform(empty)
        out[i] = torch.as_tensor(transform.mask).reshape(width)
    return out


def undersample(
    kspace: torch.Tensor, acceleration: float, center_fraction: float, mask: str, seeds: Sequence[int]
) -> torch.Tensor:
    """The zero-filled magnitude (N, H, W) float32 of centred 2D k-space (N, H, W, 2) (real
    and imaginary parts last), each slice's lines along W kept by its own mask drawn from
    ``seeds[i]`` (:func:`draw_masks`): MONAI's inverse centred FFT and complex magnitude."""
    if len(seeds) != len(kspace):
        raise ValueError(f"{len(kspace)} slices but {len(seeds)} mask seeds")
    lines = draw_masks(int(kspace.shape[2]), acceleration, center_fraction, mask, seeds)  # (N, W)
    out = torch.empty(kspace.shape[:3], dtype=torch.float32)
    for sl, _, magnitude in _undersampled(kspace, lines):
        out[sl] = magnitude
    return out


def _undersampled(kspace: torch.Tensor, lines: torch.Tensor):
    """By chunks of slices: (the chunk's slice, its masked k-space (n, H, W, 2), its
    zero-filled magnitude (n, H, W)), MONAI's inverse centred FFT and complex magnitude."""
    from monai.apps.reconstruction.complex_utils import complex_abs
    from monai.data.fft_utils import ifftn_centered

    for lo in range(0, len(kspace), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        masked = kspace[sl].float() * lines[sl, None, :, None]
        yield sl, masked, torch.as_tensor(complex_abs(ifftn_centered(masked, spatial_dims=2, is_complex=True)))


def undersample_packed(
    kspace: torch.Tensor, acceleration: float, center_fraction: float, mask: str, seeds: Sequence[int],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """What a k-space network reads (``model: varnet``): the packed input (N, 5, H, W) of
    data/kspace_input.py, holding the zero-filled magnitude of :func:`undersample` (the same
    masks, the same numbers), the masked k-space, the lines kept and the ground truth's
    centred size ``size`` (h, w) (default: the whole H x W)."""
    from medfed.data.kspace_input import KSPACE_CHANNELS, pack

    if len(seeds) != len(kspace):
        raise ValueError(f"{len(kspace)} slices but {len(seeds)} mask seeds")
    n, height, width = kspace.shape[:3]
    lines = draw_masks(int(width), acceleration, center_fraction, mask, seeds)
    out = torch.empty(n, KSPACE_CHANNELS, height, width, dtype=torch.float32)
    for sl, masked, magnitude in _undersampled(kspace, lines):
        out[sl] = pack(magnitude, masked, lines[sl], size or (int(height), int(width)))
    return out


def zero_filled(
    images: torch.Tensor, acceleration: float, center_fraction: float, mask: str, seeds: Sequence[int]
) -> torch.Tensor:
    """The zero-filled magnitude (N, 1, H, W) float32 of images (N, 1, H, W), each
    undersampled by its own mask drawn from ``seeds[i]`` (:func:`undersample`). With
    ``acceleration`` 1 a ``random`` mask keeps every line and the result is the image's
    magnitude (the image itself when it is >= 0); MONAI's ``equispaced`` mask never keeps
    the last line, so it misses that one."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise DataError(f"reconstruction undersamples 1-channel 2D images (N, 1, H, W), got {tuple(images.shape)}")
    check_even(tuple(images.shape[2:]), "the images")
    return undersample(to_kspace(images[:, 0].float()), acceleration, center_fraction, mask, seeds)[:, None]


def check_even(size: tuple[int, ...], what: str) -> None:
    """A DataError unless every side of ``size`` is even (the masks keep a centred band of lines)."""
    if any(int(n) % 2 for n in size):
        raise DataError(f"reconstruction needs {what} of even size (a centred band of k-space lines), got "
                        f"{'x'.join(map(str, size))}; crop or resize them to an even size")


def undersample_split(
    truth: torch.Tensor, acceleration: float, center_fraction: float, mask: str, seeds: Sequence[int],
    packed: bool = False,
) -> ArraySplit:
    """A reconstruction split: images = the zero-filled input, labels = the ground truth
    (both (N, 1, H, W) float32). ``packed``: images = the packed k-space input (N, 5, H, W)
    of a k-space network instead (:func:`undersample_packed`)."""
    truth = truth.float().contiguous()
    if not packed:
        return ArraySplit(zero_filled(truth, acceleration, center_fraction, mask, seeds), truth)
    if truth.ndim != 4 or truth.shape[1] != 1:
        raise DataError(f"reconstruction undersamples 1-channel 2D images (N, 1, H, W), got {tuple(truth.shape)}")
    check_even(tuple(truth.shape[2:]), "the images")
    return ArraySplit(undersample_packed(to_kspace(truth[:, 0]), acceleration, center_fraction, mask, seeds), truth)


def undersample_site(
    name: str, splits: dict[str, torch.Tensor], acceleration: float, center_fraction: float, mask: str,
    seed: int, site_index: int, packed: bool = False,
) -> SiteData:
    """A site's ground-truth images by split, undersampled into reconstruction splits
    (see :func:`undersample_split`; ``packed`` for a k-space network), each example's mask
    from :func:`example_seeds`."""
    made = {
        split: undersample_split(truth, acceleration, center_fraction, mask,
                                 example_seeds(seed, site_index, split, len(truth)), packed)
        for split, truth in splits.items()
    }
    return SiteData(name=name, train=made["train"], val=made["val"], test=made["test"])


def image_source_task(data) -> object:
    """The task an image source is read with before its images become ground truth: its own
    (pairs: segmentation with its mask values; volumes: 3D segmentation, class indices up
    to 254; a folder: the CSV's label columns as one column of class indices, or several of
    0/1; MedMNIST: single-label classes, 2D). The targets it reads are dropped."""
    from medfed.config import SegmentationTaskConfig, TaskConfig

    source = getattr(data, "source", None)
    if source == "pairs":
        return SegmentationTaskConfig(kind="segmentation", num_classes=len(data.mask_values), hd95=False)
    if source == "volumes":
        return SegmentationTaskConfig(kind="segmentation", num_classes=255, hd95=False)
    if source == "folder" and len(data.label_columns) > 1:
        return TaskConfig(labels="multilabel", num_classes=len(data.label_columns))
    return TaskConfig(labels="multiclass", num_classes=1000)


def in_memory(split, where: str) -> ArraySplit:
    """``split`` when it is held in memory; a DataError naming ``where`` when it streams its files."""
    if not isinstance(split, ArraySplit):
        raise DataError(f"{where}: reconstruction undersamples images held in memory, but this site streams "
                        "its files; set data.cache: memory")
    return split


def reconstruction_sites(sites: list[SiteData], task, seed: int, index: dict[str, int],
                         accelerations: dict[str, float | None] | None = None, packed: bool = False) -> list[SiteData]:
    """Sites of an image source (read and preprocessed as that source is, in memory) made
    into reconstruction sites: each grey image scaled to [0, 1] by its own minimum and
    maximum is the ground truth, its undersampling at the site's acceleration
    (``accelerations``, from ``data.sites[i].acceleration``), else the task's, the input
    (:func:`undersample_site`, the masks seeded by the site's position ``index``; ``packed``
    for a k-space network). Each example keeps its name (file, or volume and slice).

    A constant image (all black, e.g. a slice of padding) holds nothing to reconstruct: its
    NMSE is undefined (a target of zeros) and a k-space network normalises it by a standard
    deviation of zero. It is left out, and the count logged; a split whose images are all
    constant is a DataError naming the site and split."""
    accelerations = accelerations or {}
    out = []
    for site in sites:
        truth, names = {}, {}
        for split in SPLIT_INDEX:
            where = f"site '{site.name}' {split} split"
            data = in_memory(site.split(split), where)
            names[split], images = data.names, data.images
            if images.ndim != 4 or images.shape[1] != 1:
                raise DataError(f"{where}: reconstruction takes grey 2D images (N, 1, H, W), got "
                                f"{tuple(images.shape)}; set data.channels: 1 (and a 2D source)")
            check_even(tuple(images.shape[2:]), f"{where}: the images")
            lo, hi = images.flatten(1).amin(1), images.flatten(1).amax(1)
            varies = hi > lo
            if not bool(varies.all()):
                if not bool(varies.any()):
                    raise DataError(f"{where}: all {len(images)} image(s) are constant (nothing to reconstruct); "
                                    "check the images")
                keep = torch.nonzero(varies).flatten()
                log.info("%s: %d constant image(s) left out (nothing to reconstruct), %d kept", where,
                         len(images) - len(keep), len(keep))
                images, lo, hi = images[keep], lo[keep], hi[keep]
                names[split] = None if names[split] is None else tuple(names[split][int(i)] for i in keep)
            truth[split] = (images - lo[:, None, None, None]) / (hi - lo)[:, None, None, None]
        own = accelerations.get(site.name)
        made = undersample_site(site.name, truth, own if own is not None else task.acceleration,
                                task.center_fraction, task.mask, seed, index[site.name], packed)
        named = {split: replace(made.split(split), names=names[split]) for split in SPLIT_INDEX}
        out.append(SiteData(site.name, named["train"], named["val"], named["test"], site.skipped))
    return out
