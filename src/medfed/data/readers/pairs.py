"""Image/mask pairs for segmentation, read from two folders and matched by file name.

An image without its mask, or a mask without its image, is an error that names every
unmatched file: a pair is never dropped silently nor paired with the wrong file. Masks
are stored with arbitrary grey levels (e.g. 0/255, or 0/128/255); ``mask_values`` lists
them in class order and they become class indices 0..K-1.

Not wired into job files yet (segmentation jobs come with issue 3); used by tests and
scripts on the multi-site prostate and fundus slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.core.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class SegmentationSplit:
    """``images``: float32 (N, C, H, W) in [0, 1]; ``masks``: int64 (N, H, W) class indices;
    ``names``: the file stem of each pair."""

    images: torch.Tensor
    masks: torch.Tensor
    names: tuple[str, ...]


def _files(folder: Path, site: str, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"site '{site}': {what} folder '{folder}' not found")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def match_pairs(image_dir: Path, mask_dir: Path, site: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem, sorted by name; unmatched files are an error."""
    images = _files(Path(image_dir), site, "image")
    masks = _files(Path(mask_dir), site, "mask")
    lonely_images = sorted(images.keys() - masks.keys())
    lonely_masks = sorted(masks.keys() - images.keys())
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"images without a mask: {', '.join(images[n].name for n in lonely_images)}")
        if lonely_masks:
            parts.append(f"masks without an image: {', '.join(masks[n].name for n in lonely_masks)}")
        raise DataError(f"site '{site}': {'; '.join(parts)} (in '{image_dir}' and '{mask_dir}')")
    if not images:
        raise DataError(f"site '{site}': no image files in '{image_dir}'")
    return [(images[n], masks[n]) for n in sorted(images)]


def _read(path: Path, site: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"site '{site}': cannot read '{path}' ({type(e).__name__}: {e})") from None


def load_pairs(pairs: list[tuple[Path, Path]], site: str, mask_values: tuple[int, ...]) -> SegmentationSplit:
    """Read matched pairs; every image must have its mask's height and width, every mask
    only the grey levels in ``mask_values``, and all images one size and channel count."""
    lut = {v: i for i, v in enumerate(mask_values)}
    images, masks = [], []
    for img_path, mask_path in pairs:
        img, mask = _read(img_path, site), _read(mask_path, site)
        if mask.ndim == 3:  # masks saved as RGB(A) grey: take one channel
            mask = mask[..., 0]
        if img.shape[:2] != mask.shape:
            raise DataError(
                f"site '{site}': image '{img_path.name}' is {img.shape[1]}x{img.shape[0]} "
                f"but its mask is {mask.shape[1]}x{mask.shape[0]}"
            )
        found = np.unique(mask)
        unknown = [int(v) for v in found if int(v) not in lut]
        if unknown:
            raise DataError(
                f"site '{site}': mask '{mask_path.name}' holds value(s) {unknown} outside the declared {list(mask_values)}"
            )
        img = img[..., None] if img.ndim == 2 else img[..., :3]
        images.append(np.moveaxis(img, -1, 0).astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0))
        table = np.zeros(int(found.max()) + 1, dtype=np.int64)
        for v in found:
            table[int(v)] = lut[int(v)]
        masks.append(table[mask])
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"site '{site}': images differ in size or channels: {sorted(shapes)}")
    return SegmentationSplit(
        images=torch.from_numpy(np.stack(images)),
        masks=torch.from_numpy(np.stack(masks)),
        names=tuple(p.stem for p, _ in pairs),
    )
