"""Image/mask pairs for 2D segmentation, read from two folders and matched by file name.

What it accepts: image and mask files with the suffixes in ``IMAGE_SUFFIXES`` (PNG,
JPEG, TIFF, BMP; hidden files are ignored), paired by file stem. An image without its
mask, or a mask without its image, is an error that names every unmatched file, also
with ``on_bad_file: skip``: a pair is never dropped silently nor paired with the wrong
file. Two files of one stem in a folder (``a.png`` and ``a.jpg``) are an error too.

Images are decoded as :func:`medfed.data.readers.folder.read_image` describes
(``channels: 1`` grey, colour converted with Pillow's ``L``; ``channels: 3`` RGB) to
float32 (C, H, W) in [0, 1]. Masks store grey levels (e.g. 0/255, or 0/128/255);
``mask_values`` lists them in class order and they become int64 class indices 0..K-1.
A mask saved as RGB(A) must hold the same value in its colour channels; a palette mask
gives its palette indices; a 1-bit mask gives 0/255. A mask holding another value, or of
another height and width than its image, is an error naming it.

``on_bad_file: skip`` drops a pair whose image or mask cannot be read on its own
(corrupt, truncated, unsupported, colour mask) and reports the file in ``skipped``.
Record names are the image file name, prefixed with the set (``train/00_00.png``) for a
site's train/val/test sets; ``split`` is the set name, None for an undivided set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.config import PairsData
from medfed.core.errors import DataError
from medfed.data.base import Record, SiteIndex, SiteRecords
from medfed.data.readers.folder import (
    UnreadableFile,
    is_hidden,
    match_names,
    read_entries,
    read_image,
    record_name,
    require_records,
    set_split,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class SegmentationSplit:
    """``images``: float32 (N, C, H, W) in [0, 1]; ``masks``: int64 (N, H, W) class indices;
    ``names``: the file stem of each pair."""

    images: torch.Tensor
    masks: torch.Tensor
    names: tuple[str, ...]


def _files(folder: Path, site: str, what: str) -> dict[str, Path]:
    """Image files of ``folder`` by stem; two files of one stem are an error."""
    if not folder.is_dir():
        raise DataError(f"site '{site}': {what} folder '{folder}' not found")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or is_hidden(p) or not p.is_file():
            continue
        if p.stem in out:
            raise DataError(
                f"site '{site}': {what} files '{out[p.stem].name}' and '{p.name}' in '{folder}' share the name "
                f"'{p.stem}'; pairs are matched by name, keep one"
            )
        out[p.stem] = p
    return out


def match_pairs(image_dir: Path, mask_dir: Path, site: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem, sorted by name; unmatched files are an error."""
    images = _files(Path(image_dir), site, "image")
    masks = _files(Path(mask_dir), site, "mask")
    return [(images[n], masks[n]) for n in match_names(images, masks, site, image_dir, mask_dir, "image files")]


def read_mask(path: Path, site: str) -> np.ndarray:
    """The stored grey levels of a mask file, (H, W). Raises UnreadableFile."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode == "1" else im)
    except Exception as e:  # Pillow raises many types for damaged files
        raise UnreadableFile(site, path, f"cannot be read as a mask image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:  # RGB(A) or LA: grey stored in colour channels, alpha ignored
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        differ = int(np.count_nonzero((colour != colour[..., :1]).any(axis=-1)))
        if differ:
            raise UnreadableFile(
                site, path, f"colour mask: its channels differ at {differ} pixel(s); store class grey levels"
            )
        arr = colour[..., 0]
    if arr.ndim != 2:
        raise UnreadableFile(site, path, f"mask of shape {arr.shape} is not a 2D image")
    return arr


def mask_classes(mask: np.ndarray, mask_values: tuple[int, ...] | list[int], path: Path, site: str) -> np.ndarray:
    """int64 class indices from the stored grey levels; a level not declared is an error."""
    values = np.asarray(mask_values)
    order = np.argsort(values)
    ranked = values[order]
    pos = np.clip(np.searchsorted(ranked, mask), 0, len(ranked) - 1)
    ok = ranked[pos] == mask
    if not ok.all():
        unknown = np.unique(mask[~ok])
        shown = [v.item() for v in unknown[:10]] + (["..."] if len(unknown) > 10 else [])
        raise DataError(f"site '{site}': mask '{path}' holds value(s) {shown} outside mask_values {list(mask_values)}")
    return order[pos].astype(np.int64)


def load_pair(image: Path, mask: Path, site: str, mask_values, channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One pair: float32 (C, H, W) image in [0, 1] and int64 (H, W) class indices.
    ``channels`` None keeps the image's own (1 for grey, 3 for colour). Raises
    UnreadableFile for a file that cannot be read, DataError for a size mismatch or
    undeclared mask values."""
    if channels is None:
        channels = _stored_channels(image, site)
    img = read_image(image, channels, site)
    msk = read_mask(mask, site)
    if img.shape[1:] != msk.shape:
        raise DataError(
            f"site '{site}': '{image}': image is {img.shape[2]}x{img.shape[1]} (width x height) "
            f"but its mask '{mask}' is {msk.shape[1]}x{msk.shape[0]}"
        )
    return img, mask_classes(msk, mask_values, mask, site)


def _stored_channels(path: Path, site: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return 1 if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16") else 3
    except Exception as e:
        raise UnreadableFile(site, path, f"cannot be read as an image ({type(e).__name__}: {e})") from None


def load_pairs(pairs: list[tuple[Path, Path]], site: str, mask_values: tuple[int, ...],
               channels: int | None = None) -> SegmentationSplit:
    """Read matched pairs into one stacked split (all images one size and channel count);
    errors as :func:`load_pair`."""
    loaded = [load_pair(i, m, site, mask_values, channels) for i, m in pairs]
    shapes = {img.shape for img, _ in loaded}
    if len(shapes) > 1:
        raise DataError(f"site '{site}': images differ in size or channels: {sorted(shapes)}")
    return SegmentationSplit(
        images=torch.from_numpy(np.stack([img for img, _ in loaded])),
        masks=torch.from_numpy(np.stack([m for _, m in loaded])),
        names=tuple(p.stem for p, _ in pairs),
    )


@dataclass(frozen=True, eq=False)
class PairEntry:
    """One image/mask pair of a site (an index row; see :class:`~medfed.data.base.Entry`)."""

    name: str
    split: str | None
    image: Path
    mask: Path
    mask_values: tuple[int, ...]
    channels: int | None
    site: str
    target: None = None

    def read(self) -> Record:
        img, target = load_pair(self.image, self.mask, self.site, self.mask_values, self.channels)
        return Record(self.name, img, target, None, self.split)

    def files(self) -> tuple[str, ...]:
        return (str(self.image), str(self.mask))


def index_pair_sites(cfg: PairsData) -> list[SiteIndex]:
    """Every site's image/mask pairs matched by name, in the job's site order, without
    reading a pixel; unmatched files are an error."""
    out = []
    for site in cfg.sites:
        index = SiteIndex(site.name)
        for set_name, fs in site.file_sets().items():
            assert fs.masks is not None  # the schema requires a masks folder
            for image, mask in match_pairs(fs.images, fs.masks, site.name):
                index.entries.append(PairEntry(
                    record_name(set_name, image.name), set_split(set_name), image, mask, tuple(cfg.mask_values),
                    cfg.channels, site.name,
                ))
        out.append(index)
    return out


def read_pair_sites(cfg: PairsData) -> list[SiteRecords]:
    """Every site's image/mask pairs as records, in the job's site order (see the module
    docstring). Images of different sizes are allowed (preprocessing resizes them)."""
    return [require_records(read_entries(i, cfg.on_bad_file), "its image/mask pairs") for i in index_pair_sites(cfg)]
