"""Image files with a CSV of labels, for classification; and the 2D image decoding that
the pair reader shares.

What it accepts
---------------
Images: one image per file in any format Pillow decodes (PNG, JPEG, TIFF, BMP, ...);
multi-page files are refused. Every image comes back float32 (C, H, W) in [0, 1]:

- ``channels: 1`` (grey). 8-bit grey (mode ``L``) is divided by 255; 1-bit images give
  0 or 1; 16-bit grey (modes ``I;16*``, e.g. 16-bit PNG and TIFF) is divided by 65535,
  the largest value of the type, not by the image's own maximum, so intensities stay
  comparable between files; 32-bit integer images (mode ``I``) are read the same way
  when their values fit 0..65535 and refused otherwise; 32-bit float images (mode ``F``)
  are taken as they are when their values lie in [0, 1] and refused otherwise. Colour
  images (RGB, RGBA, palette, CMYK, YCbCr) are turned into grey by Pillow's ``L``
  conversion (ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B); alpha is dropped.
- ``channels: 3`` (RGB). Colour images are converted to RGB (alpha dropped); grey
  images, scaled as above, are repeated in the three channels.

DICOM (``.dcm``, ``.dicom``, or any file whose preamble carries the ``DICM`` marker) is read
by :mod:`medfed.data.readers.dicom_image`: one image per file (multi-frame files are
refused), compressed transfer syntaxes through pydicom's plugins; grey images go through
the modality LUT (rescale) and the VOI LUT (the file's window or VOI LUT, or the job's
``dicom_window`` in their place; without any window, the stored bit depth's range maps
to [0, 1]), MONOCHROME1 is inverted; colour (RGB, YBR, palette) is read as RGB and turned
into grey with the luma weights above when ``channels: 1``. Refusal reasons name the
file and technical attributes only, never a header value that identifies a patient.

Images may differ in size; preprocessing resizes them later.

CSV (read with the stdlib ``csv`` module, UTF-8, a byte-order mark is allowed): a header
row, then one row per image; blank rows are ignored, header names and values are
stripped of surrounding spaces. ``file_column`` holds the image path relative to the
images folder; a file listed twice is an error. ``label_columns``: one column of class
indices 0..num_classes-1 (binary and multi-class tasks) or one 0/1 column per label,
exactly ``num_classes`` of them (multi-label tasks); a row whose label cells are all empty
has no label (an unlabeled example: it trains only with ``semi_supervised`` and never goes
to val or test, data/labels.py). ``split_column`` (optional) holds
train, val or test (any case). Line numbers in messages count the header as line 1.

Sites: ``sites`` (each site its own folder and CSV per file set; a train/val/test set's
split is its name, an undivided set takes the split column when there is one, else no
split), ``sites_by`` (one CSV, a column names each row's site) or ``partition`` (one
:class:`SiteRecords` named ``""`` with every record; the caller partitions it).

``on_bad_file: skip`` leaves out image files that cannot be read on their own (corrupt,
truncated, not an image, unsupported pixel format) and lists them in ``skipped``; a
missing file and anything wrong in the CSV stay errors. Record names are the CSV's file
value, prefixed with the set name (``train/x.png``) for a site's train/val/test sets.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.config import DicomWindow, FileSet, FolderData, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import Record, SiteIndex, SiteRecords

SPLIT_VALUES = ("train", "val", "test")
_WIDE_INT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableFile(DataError):
    """A file that cannot be read on its own: corrupt, truncated, not of its format, or
    holding values the reader cannot use. ``on_bad_file: skip`` leaves such files out;
    problems between files or with the job stay plain :class:`DataError`."""

    def __init__(self, site: str, path: Path | str, reason: str):
        super().__init__(f"{site_prefix(site)}'{path}': {reason}")
        self.path = str(path)
        self.reason = reason


def site_prefix(site: str) -> str:
    """``site 'NAME': `` for messages, or nothing when the site is not known yet."""
    return f"site '{site}': " if site else ""


def set_split(set_name: str) -> str | None:
    """The split a site's file set stands for: its name, or None for an undivided set."""
    return None if set_name == "all" else set_name


def record_name(set_name: str, name: str) -> str:
    """A record's name: the file's name, prefixed by the set when the site has several."""
    return name if set_name == "all" else f"{set_name}/{name}"


def is_hidden(path: Path) -> bool:
    """Hidden files (``.DS_Store``, macOS ``._x.png``) are never data."""
    return path.name.startswith(".")


def require_records(site: SiteRecords, where: str) -> SiteRecords:
    """``site`` itself; an error when it holds no records (empty folder, all skipped)."""
    if not site.records:
        skipped = f"; all {len(site.skipped)} file(s) were skipped as unreadable" if site.skipped else ""
        raise DataError(f"{site_prefix(site.name)}no examples in {where}{skipped}")
    return site


def match_names(
    images: dict[str, Path], masks: dict[str, Path], site: str, image_dir: Path, mask_dir: Path, what: str
) -> list[str]:
    """The names shared by ``images`` and ``masks``, sorted. An image without its mask, or
    a mask without its image, is an error listing every unmatched file; so is an empty
    images folder (``what`` names what it should hold)."""
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
        raise DataError(f"site '{site}': no {what} in '{image_dir}'")
    return sorted(images)


# --------------------------------------------------------------------------- images


def read_image(path: Path, channels: int, site: str, *, window: DicomWindow | None = None) -> np.ndarray:
    """float32 (channels, H, W) in [0, 1] from one image file (see the module docstring);
    ``window`` replaces the VOI windows of a DICOM file. Raises :class:`UnreadableFile`
    naming the site and file."""
    from medfed.data.readers.dicom_image import DicomUnreadable, is_dicom, read_dicom_image

    if is_dicom(path):
        try:
            return read_dicom_image(path, channels, window)
        except DicomUnreadable as e:
            raise UnreadableFile(site, path, e.reason) from None
    from PIL import Image

    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                raise UnreadableFile(site, path, f"holds {frames} images (a multi-page file); give one image per file")
            im.load()
            return _pixels(im, channels, site, path)
    except UnreadableFile:
        raise
    except Exception as e:  # Pillow raises many types for damaged files (OSError, SyntaxError, ...)
        raise UnreadableFile(site, path, f"cannot be read as an image ({type(e).__name__}: {e})") from None


def _pixels(im, channels: int, site: str, path: Path) -> np.ndarray:
    """The decoded Pillow image as float32 (channels, H, W) in [0, 1]."""
    if im.mode in _WIDE_INT or im.mode == "F":
        grey = _wide_grey(np.asarray(im), im.mode, site, path)[None]
        return grey if channels == 1 else np.repeat(grey, 3, axis=0)
    target = "L" if channels == 1 else "RGB"
    arr = np.asarray(im if im.mode == target else im.convert(target), dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def _wide_grey(arr: np.ndarray, mode: str, site: str, path: Path) -> np.ndarray:
    """16/32-bit integer grey / 65535, or float grey taken as it is if in [0, 1]."""
    if mode == "F":
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise UnreadableFile(site, path, f"{int(np.count_nonzero(~np.isfinite(out)))} pixel value(s) are NaN or Inf")
        if out.size and (out.min() < 0 or out.max() > 1):
            raise UnreadableFile(
                site, path, f"float image with values in {out.min():g}..{out.max():g}; float images must lie in [0, 1]"
            )
        return out
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise UnreadableFile(
            site, path, f"32-bit integer image with values in {int(arr.min())}..{int(arr.max())}; store 8 or 16 bits"
        )
    return arr.astype(np.float32) / 65535.0


# --------------------------------------------------------------------------- CSV


@dataclass(frozen=True)
class _Row:
    line: int
    file: str
    target: np.ndarray
    split: str | None
    site: str | None
    labeled: bool = True


@dataclass(frozen=True)
class _Columns:
    """The job's column names and what each CSV must be checked for."""

    file: str
    labels: tuple[str, ...]
    split: str | None
    site: str | None

    def needed(self) -> list[str]:
        return [self.file, *self.labels, *(c for c in (self.split, self.site) if c is not None)]


def check_label_columns(cfg: FolderData, task: TaskConfig) -> None:
    """The label columns fit the task: one column of class indices, or one 0/1 column
    per label for a multi-label task."""
    if getattr(task, "kind", "classification") != "classification":
        raise DataError(f"folder data (image files with a CSV of labels) is for classification, not {task.kind}")
    cols = list(cfg.label_columns)
    if task.labels == "multilabel":
        if len(cols) != task.num_classes:
            raise DataError(
                f"data.label_columns: a multilabel task takes one 0/1 column per label, "
                f"task.num_classes={task.num_classes}, got {len(cols)} column(s) {cols}"
            )
    elif len(cols) != 1:
        raise DataError(
            f"data.label_columns: a {task.labels} task takes one column of class indices, got {len(cols)} "
            f"columns {cols}; several 0/1 columns are for task.labels: multilabel"
        )
    if len(set(cols)) != len(cols):
        raise DataError(f"data.label_columns: a column is named twice in {cols}")


def _open_rows(path: Path, prefix: str):
    """(header, [(line, cells)]) of a CSV file; blank rows left out."""
    if not path.is_file():
        raise DataError(f"{prefix}CSV file '{path}' not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except UnicodeDecodeError as e:
        raise DataError(f"{prefix}'{path}': not a UTF-8 text CSV ({e})") from None
    except csv.Error as e:
        raise DataError(f"{prefix}'{path}': malformed CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{prefix}'{path}': cannot be read ({e})") from None
    if header is None:
        raise DataError(f"{prefix}'{path}': the CSV is empty (no header row)")
    return [h.strip() for h in header], rows


def _column_index(header: list[str], cols: _Columns, path: Path, prefix: str) -> dict[str, int]:
    """Position of each needed column; a missing or repeated one is an error."""
    missing = [c for c in cols.needed() if c not in header]
    if missing:
        raise DataError(f"{prefix}'{path}': missing column(s) {missing}; the columns found are {header}")
    twice = sorted({c for c in cols.needed() if header.count(c) > 1})
    if twice:
        raise DataError(f"{prefix}'{path}': column(s) {twice} appear more than once in the header")
    return {c: header.index(c) for c in cols.needed()}


def _class_index(value: str, column: str, task: TaskConfig, at: str) -> np.ndarray:
    """A 0-d int64 class index in 0..num_classes-1 ("2" and "2.0" are both 2)."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise DataError(f"{at}: label {value!r} in column '{column}' is not a class index (a whole number)")
    if not 0 <= number < task.num_classes:
        raise DataError(
            f"{at}: label {value!r} in column '{column}' is outside 0..{task.num_classes - 1} "
            f"({task.labels} task, num_classes={task.num_classes})"
        )
    return np.array(int(number), dtype=np.int64)


def _multilabel(values: list[str], columns: tuple[str, ...], at: str) -> np.ndarray:
    """A float32 (K,) vector of 0/1 from one cell per label column."""
    out = np.zeros(len(values), dtype=np.float32)
    for i, (value, column) in enumerate(zip(values, columns)):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number not in (0.0, 1.0):
            raise DataError(f"{at}: label {value!r} in column '{column}' must be 0 or 1 (multilabel task)")
        out[i] = number
    return out


def _parse_row(line: int, cells: list[str], index: dict[str, int], cols: _Columns, task: TaskConfig, at: str) -> _Row:
    """One CSV row checked: file, label(s), split and site values."""
    def cell(column: str) -> str:
        i = index[column]
        value = cells[i].strip() if i < len(cells) else ""
        if not value:
            raise DataError(f"{at}: empty value in column '{column}'")
        return value

    site = cell(cols.site) if cols.site else None
    if site is not None:
        at = f"site '{site}': {at}"
    if all(_blank(cells, index[c]) for c in cols.labels):  # no label: an unlabeled example (data/labels.py)
        width = () if len(cols.labels) == 1 and task.labels != "multilabel" else (len(cols.labels),)
        placeholder = np.zeros(width, dtype=np.int64 if not width else np.float32)
        return _Row(line, cell(cols.file), placeholder, _split_cell(cells, index, cols, at), site, labeled=False)
    if len(cols.labels) == 1 and task.labels != "multilabel":
        target = _class_index(cell(cols.labels[0]), cols.labels[0], task, at)
    else:
        target = _multilabel([cell(c) for c in cols.labels], cols.labels, at)
    return _Row(line, cell(cols.file), target, _split_cell(cells, index, cols, at), site)


def _blank(cells: list[str], i: int) -> bool:
    return i >= len(cells) or not cells[i].strip()


def _split_cell(cells: list[str], index: dict[str, int], cols: _Columns, at: str) -> str | None:
    """The row's split (train, val or test), or None without a split column."""
    if not cols.split:
        return None
    if _blank(cells, index[cols.split]):
        raise DataError(f"{at}: empty value in column '{cols.split}'")
    split = cells[index[cols.split]].strip().lower()
    if split not in SPLIT_VALUES:
        raise DataError(f"{at}: split {cells[index[cols.split]].strip()!r} in column '{cols.split}' must be train, val or test")
    return split


def _read_csv(path: Path, cols: _Columns, task: TaskConfig, site: str = "") -> list[_Row]:
    """The rows of one labels CSV, checked; a file listed twice is an error."""
    prefix = site_prefix(site)
    header, rows = _open_rows(path, prefix)
    index = _column_index(header, cols, path, prefix)
    if not rows:
        raise DataError(f"{prefix}'{path}': the CSV has a header but no rows")
    out, seen = [], {}
    for line, cells in rows:
        at = f"'{path}' line {line}"
        row = _parse_row(line, cells, index, cols, task, f"{prefix}{at}")
        key = os.path.normpath(row.file)
        if key in seen:
            raise DataError(f"{prefix}{at}: file '{row.file}' is listed twice (lines {seen[key]} and {line})")
        seen[key] = line
        out.append(row)
    return out


# --------------------------------------------------------------------------- sites


def _require_folder(images: Path, site: str) -> None:
    if not images.is_dir():
        raise DataError(f"{site_prefix(site)}images folder '{images}' not found")


@dataclass(frozen=True, eq=False)
class ImageEntry:
    """One image file of a folder site, with its CSV label (an index row; see
    :class:`~medfed.data.base.Entry`)."""

    name: str
    split: str | None
    target: np.ndarray
    path: Path
    channels: int
    site: str
    window: DicomWindow | None = None
    labeled: bool = True  # False: a CSV row with its label cells empty (target: zeros)

    def read(self) -> Record:
        image = read_image(self.path, self.channels, self.site, window=self.window)
        return Record(self.name, image, self.target, None, self.split, self.labeled)

    def files(self) -> tuple[str, ...]:
        return (str(self.path),)


def read_entries(
    index: SiteIndex, on_bad_file: str, prepare: Callable[[Record], Record] | None = None
) -> SiteRecords:
    """Every entry of ``index`` read (and passed through ``prepare`` as soon as it is read,
    so only prepared records are held); with ``on_bad_file: skip`` an unreadable file is
    left out and listed in ``skipped``, else its :class:`UnreadableFile` is raised."""
    out = SiteRecords(index.name)
    for entry in index.entries:
        try:
            record = entry.read()
            out.records.append(prepare(record) if prepare is not None else record)
        except UnreadableFile as e:
            if on_bad_file != "skip":
                raise
            out.skipped.append((e.path, e.reason))
    return out


def _entries(rows: list[_Row], images: Path, csv_path: Path, set_name: str, cfg: FolderData, site: SiteIndex) -> None:
    """Index the images of ``rows`` into ``site``; a missing file is an error."""
    prefix = site_prefix(site.name)
    _require_folder(images, site.name)
    for row in rows:
        path = images / row.file
        if not path.is_file():
            raise DataError(f"{prefix}'{path}': image file not found (listed in '{csv_path}' line {row.line})")
        split = set_split(set_name) if set_name != "all" else row.split
        site.entries.append(
            ImageEntry(record_name(set_name, row.file), split, row.target, path, cfg.channels, site.name, cfg.dicom_window,
                       row.labeled)
        )


def _columns(cfg: FolderData, site_column: str | None = None, with_split: bool = True) -> _Columns:
    return _Columns(cfg.file_column, tuple(cfg.label_columns), cfg.split_column if with_split else None, site_column)


def _file_site(name: str, sets: dict[str, FileSet], cfg: FolderData, task: TaskConfig) -> SiteIndex:
    out = SiteIndex(name)
    for set_name, fs in sets.items():
        assert fs.csv is not None  # the schema requires a csv for every set
        _require_folder(fs.images, name)
        rows = _read_csv(fs.csv, _columns(cfg, with_split=set_name == "all"), task, name)
        _entries(rows, fs.images, fs.csv, set_name, cfg, out)
    return out


def _sites_by(cfg: FolderData, task: TaskConfig) -> list[SiteIndex]:
    assert cfg.sites_by is not None and cfg.csv is not None and cfg.images is not None
    _require_folder(cfg.images, "")
    by = cfg.sites_by
    rows = _read_csv(cfg.csv, _columns(cfg, by.column), task)
    groups: dict[str, list[_Row]] = {s: [] for s in by.sites}
    unknown: dict[str, int] = {}
    for r in rows:
        if r.site in groups:
            groups[r.site].append(r)
        else:
            unknown[r.site or ""] = unknown.get(r.site or "", 0) + 1
    if unknown:
        listed = ", ".join(f"'{v}' ({n} row{'s' * (n != 1)})" for v, n in sorted(unknown.items()))
        raise DataError(
            f"'{cfg.csv}': column '{by.column}' holds value(s) that are not sites in data.sites_by.sites "
            f"{list(by.sites)}: {listed}"
        )
    empty = [s for s, g in groups.items() if not g]
    if empty:
        raise DataError(f"'{cfg.csv}': site(s) {empty} of data.sites_by.sites have no rows in column '{by.column}'")
    out = []
    for name in by.sites:
        site = SiteIndex(name)
        _entries(groups[name], cfg.images, cfg.csv, "all", cfg, site)
        out.append(site)
    return out


def index_folder(cfg: FolderData, task: TaskConfig) -> list[SiteIndex]:
    """Every site's image files with their labels, in the job's site order, without
    reading a pixel (see the module docstring). With ``cfg.partition`` the result is ONE
    :class:`SiteIndex` named ``""`` holding every entry; the caller splits it into sites.
    Raises DataError naming the site, the file (and CSV line) and the problem."""
    check_label_columns(cfg, task)
    if cfg.sites is not None:
        return [_file_site(s.name, s.file_sets(), cfg, task) for s in cfg.sites]
    if cfg.sites_by is not None:
        return _sites_by(cfg, task)
    assert cfg.csv is not None and cfg.images is not None  # the schema requires both
    _require_folder(cfg.images, "")
    site = SiteIndex("")
    _entries(_read_csv(cfg.csv, _columns(cfg), task), cfg.images, cfg.csv, "all", cfg, site)
    return [site]


def read_folder(cfg: FolderData, task: TaskConfig) -> list[SiteRecords]:
    """:func:`index_folder` with every image read (``on_bad_file`` applies); a site left
    with no examples is an error."""
    where = {s.name: "its image files" for s in cfg.sites or []}
    return [
        require_records(read_entries(index, cfg.on_bad_file), where.get(index.name, f"'{cfg.csv}'"))
        for index in index_folder(cfg, task)
    ]
