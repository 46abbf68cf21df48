"""Medical volumes: NIfTI (nibabel) and DICOM (pydicom), with their voxel spacing, and
the 3D segmentation sites built from them.

What it accepts
---------------
- NIfTI: ``.nii`` and ``.nii.gz`` files. Arrays keep the file's voxel order; ``affine``
  maps voxel indices to millimetres, so orientation is kept, not guessed. A zero or
  negative spacing in the header is an error (nibabel would silently read it as 1).
- DICOM: a single-frame file gives a (rows, cols) image, a multi-frame file a
  (frames, rows, cols) volume, a folder of single-frame files (one series) a
  (slices, rows, cols) volume sorted along the slice normal. Intensities go through the
  modality transform (rescale slope and intercept, also from the functional groups of
  enhanced multi-frame files, or the modality LUT): Hounsfield units for CT. Pixel
  spacing from ``PixelSpacing`` (or the functional groups); slice spacing from the
  slice positions (series), or ``SpacingBetweenSlices``, ``GridFrameOffsetVector`` or
  ``SliceThickness`` (multi-frame). ``spacing`` is None when the file does not record
  it. Colour DICOM images are refused.

:func:`read_volume_sites` reads a :class:`VolumesData` job: images matched by name with
NIfTI label volumes in the masks folder (name = file name without ``.nii``/``.nii.gz``;
for DICOM, the series folder's name or the file name without ``.dcm``/``.dicom``/``.ima``).
Every record is 3D: image float32 (1, *spatial), target int64 (*spatial) of class indices
0..num_classes-1, spacing from the image file. A single-frame DICOM file is a volume of
one slice. The mask must have the image's array shape (size-1 axes aside) in the image's
own voxel order: for DICOM that is (slice, row, column), not the (x, y, z) order that
converters such as dcm2niix write.

With ``masks_format: seg`` the masks are DICOM SEG files matched to their series by the
SOP instances they reference, not by name (:mod:`.dicom_seg`).

Every error names the site, the file or series and the problem. ``on_bad_file: skip``
leaves out an image or mask that cannot be read on its own (corrupt, truncated, NaN
voxels, bad spacing or series geometry, colour) and lists it in ``skipped``; unmatched
names, shape mismatches and label values stay errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.config import VolumesData
from medfed.core.errors import DataError
from medfed.data.base import Record, SiteIndex, SiteRecords
from medfed.data.readers.dicom_common import functional_group as _fg
from medfed.data.readers.dicom_common import modality_transform as _rescale
from medfed.data.readers.dicom_common import scrub
from medfed.data.readers.folder import (
    UnreadableFile,
    is_hidden,
    match_names,
    read_entries,
    record_name,
    require_records,
    set_split,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class Volume:
    """``array``: float32 voxels; ``spacing``: millimetres per voxel along each array axis,
    None when the file does not record it; ``affine``: 4x4 voxel-to-world matrix when the
    format has one, else None."""

    array: np.ndarray
    spacing: tuple[float, ...] | None
    affine: np.ndarray | None = None


def _check_spacing(spacing, site: str, path) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) == 0 or any(not np.isfinite(s) or s <= 0 for s in values):
        raise UnreadableFile(site, path, f"voxel spacing must be positive, got {tuple(round(s, 6) for s in values)}")
    return values


# --------------------------------------------------------------------------- NIfTI


def _raw_spacing(path: Path, ndim: int) -> tuple[float, ...] | None:
    """pixdim as written in the file. nibabel replaces a zero spacing by 1 when it loads a
    header (with only a printed warning); a zero in the file must be an error instead."""
    import gzip

    import nibabel as nib

    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            hdr = nib.Nifti1Header.from_fileobj(f, check=False)
        return tuple(float(v) for v in hdr["pixdim"][1 : ndim + 1])
    except Exception:  # not NIfTI-1 (e.g. NIfTI-2): rely on nibabel's reading
        return None


def load_nifti(path: Path, site: str) -> Volume:
    """A NIfTI image (``.nii`` or ``.nii.gz``) with its spacing and affine. Raises
    DataError when absent, UnreadableFile when it cannot be read or is invalid."""
    import nibabel as nib

    if not Path(path).is_file():
        raise DataError(f"site '{site}': '{path}' not found")
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine)
        zooms = tuple(img.header.get_zooms()[: array.ndim])
    except Exception as e:  # nibabel raises many types for damaged files (gzip, EOF, header errors)
        raise UnreadableFile(site, path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from None
    raw = _raw_spacing(Path(path), array.ndim)
    spacing = _check_spacing(raw if raw is not None else zooms, site, path)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise UnreadableFile(site, path, f"{bad} voxel value(s) are NaN or Inf")
    return Volume(array, spacing, affine)


def _label_values(mask: np.ndarray, mask_path: Path, site: str, num_classes: int) -> np.ndarray:
    """int64 class indices; other values are an error naming the mask and the values."""
    labels = np.rint(mask).astype(np.int64)
    if labels.size and (not np.array_equal(labels, mask) or labels.min() < 0 or labels.max() >= num_classes):
        found = np.unique(mask)
        bad = [float(v) for v in found if v != np.rint(v) or not 0 <= v < num_classes]
        raise DataError(
            f"site '{site}': mask '{mask_path}' holds values {bad[:8]}{' ...' if len(bad) > 8 else ''} "
            f"outside the class indices 0..{num_classes - 1}"
        )
    return labels


def _fit_mask(image_shape: tuple, mask: np.ndarray, image: Path, mask_path: Path, site: str,
              dicom: bool = False) -> np.ndarray:
    """The mask in the image's shape (size-1 axes aside); another shape is an error."""
    if mask.shape == image_shape:
        return mask
    if mask.size == int(np.prod(image_shape)) and np.squeeze(mask).shape == tuple(d for d in image_shape if d != 1):
        return mask.reshape(image_shape)
    hint = ""
    if dicom and mask.shape == tuple(reversed(image_shape)):
        hint = "; the mask seems to be in (x, y, z) order while the image array is (slice, row, column)"
    raise DataError(f"site '{site}': image '{image}' is {image_shape} but its mask '{mask_path}' is {mask.shape}{hint}")


def load_nifti_pair(image: Path, mask: Path, site: str, num_classes: int) -> tuple[Volume, np.ndarray]:
    """An image volume and its label volume (int64 class indices in 0..num_classes-1),
    which must share the image's shape and spacing."""
    img, msk = load_nifti(image, site), load_nifti(mask, site)
    array = _fit_mask(img.array.shape, msk.array, image, mask, site)
    if array is msk.array and not np.allclose(img.spacing, msk.spacing, rtol=1e-3):
        raise DataError(f"site '{site}': image '{image}' spacing {img.spacing} differs from its mask's {msk.spacing}")
    return img, _label_values(array, mask, site, num_classes)


# --------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path, site: str):
    """(dataset, float32 pixels after the modality transform). Raises UnreadableFile."""
    import pydicom

    ds = None
    try:
        ds = pydicom.dcmread(str(path))
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise UnreadableFile(site, path, f"colour DICOM image (SamplesPerPixel {ds.SamplesPerPixel}); volumes are grey")
        pixels = _rescale(ds, ds.pixel_array)
    except UnreadableFile:
        raise
    except Exception as e:  # pydicom raises many types for damaged files (EOF, VR, decoder errors)
        # no header value that identifies a patient may leave the site: a message is kept only
        # where the header it could quote is known (and blanked out), or it quotes none
        text = f"{type(e).__name__}: {e}"
        if ds is not None:
            text = scrub(text, ds)
        elif not isinstance(e, pydicom.errors.InvalidDicomError):
            text = type(e).__name__
        raise UnreadableFile(site, path, f"not a readable DICOM image ({text})") from None
    if not np.isfinite(pixels).all():
        raise UnreadableFile(site, path, "pixel values are NaN or Inf after rescale")
    return ds, pixels


def _floats(value) -> tuple[float, ...] | None:
    """A DICOM number or list of numbers as floats; None when absent or not numeric."""
    if value is None or value == "":
        return None
    items = value if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else [value]
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds) -> tuple[float, ...] | None:
    spacing = _floats(ds.get("PixelSpacing")) or _floats(_fg(ds, "PixelMeasuresSequence", "PixelSpacing"))
    return spacing if spacing is not None and len(spacing) == 2 else None


def _frame_gap(ds) -> float | None:
    """Distance between frames of a multi-frame file, when recorded."""
    for value in (ds.get("SpacingBetweenSlices"), _fg(ds, "PixelMeasuresSequence", "SpacingBetweenSlices")):
        gap = _floats(value)
        if gap:
            return abs(gap[0])
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    if offsets and len(offsets) > 1:
        gaps = np.abs(np.diff(offsets))
        return float(gaps[0]) if np.allclose(gaps, gaps[0], rtol=1e-3) else None
    thickness = _floats(ds.get("SliceThickness")) or _floats(_fg(ds, "PixelMeasuresSequence", "SliceThickness"))
    return thickness[0] if thickness else None


def _load_dicom(path: Path, site: str) -> tuple[Volume, object]:
    """(volume, dataset) of one DICOM file; see :func:`load_dicom`."""
    if not Path(path).is_file():
        raise DataError(f"site '{site}': '{path}' not found")
    ds, array = _read_dicom(Path(path), site)
    pixel = _pixel_spacing(ds)
    spacing: tuple[float, ...] | None = pixel
    if array.ndim == 3:
        gap = _frame_gap(ds)
        spacing = None if pixel is None or gap is None else (gap, *pixel)
    return Volume(array, None if spacing is None else _check_spacing(spacing, site, path)), ds


def load_dicom(path: Path, site: str) -> Volume:
    """One DICOM file: a 2D image (rows, cols), or a multi-frame volume (frames, rows,
    cols). ``spacing`` is None when the file does not record it."""
    return _load_dicom(path, site)[0]


def _series_slice(f: Path, folder: Path, site: str):
    ds, array = _read_dicom(f, site)
    if array.ndim != 2:
        raise UnreadableFile(site, folder, f"series file '{f.name}' has {array.ndim} dimensions; a series holds single frames")
    try:
        orient = np.array([float(v) for v in ds.ImageOrientationPatient])
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        raise UnreadableFile(site, folder, f"series file '{f.name}' lacks its position or orientation") from None
    if orient.shape != (6,) or pos.shape != (3,):
        raise UnreadableFile(site, folder, f"series file '{f.name}' has a malformed position or orientation")
    return ds.get("SeriesInstanceUID"), orient, pos, _pixel_spacing(ds), array, ds


def load_dicom_series(folder: Path, site: str) -> Volume:
    """The single-frame DICOM files of one folder as a (slices, rows, cols) volume, sorted
    by position along the slice normal; slice spacing from the positions. Files that
    disagree in size, pixel spacing or orientation, belong to several series, or two
    slices at one position, are an error naming the series (UnreadableFile)."""
    return _dicom_series(folder, site)[0]


def _dicom_series(folder: Path, site: str) -> tuple[Volume, list[str]]:
    """:func:`load_dicom_series`, with the slices' SOP Instance UIDs in the volume's order."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not is_hidden(p)) if folder.is_dir() else []
    if not files:
        raise DataError(f"site '{site}': DICOM series '{folder}' has no files")
    slices = [_series_slice(f, folder, site) for f in files]
    uids = {s[0] for s in slices}
    if len(uids) > 1:
        raise UnreadableFile(site, folder, f"the folder holds files of {len(uids)} DICOM series; one series per folder")
    _, orient0, _, spacing0, array0, ds0 = slices[0]
    for f, (_, orient, _, spacing, array, _) in zip(files[1:], slices[1:]):
        differ = []
        if array.shape != array0.shape:
            differ.append(f"size {array.shape} vs {array0.shape}")
        if spacing != spacing0 and not (spacing and spacing0 and np.allclose(spacing, spacing0)):
            differ.append(f"pixel spacing {spacing} vs {spacing0}")
        if not np.allclose(orient, orient0, atol=1e-4):
            differ.append(f"orientation {orient.round(4).tolist()} vs {orient0.round(4).tolist()}")
        if differ:
            raise UnreadableFile(
                site, folder, f"DICOM series has inconsistent geometry: '{f.name}' differs from "
                f"'{files[0].name}' in {', '.join(differ)}"
            )
    normal = np.cross(orient0[:3], orient0[3:])
    slices.sort(key=lambda s: float(np.dot(normal, s[2])))
    depths = np.array([float(np.dot(normal, s[2])) for s in slices])
    gaps = np.diff(depths)
    if len(gaps) and (np.any(gaps <= 1e-6) or not np.allclose(gaps, gaps[0], rtol=1e-2)):
        raise UnreadableFile(
            site, folder, f"DICOM series has uneven or repeated slice positions (gaps {np.round(gaps, 3).tolist()[:5]})"
        )
    gap = float(gaps[0]) if len(gaps) else _frame_gap(ds0)
    volume = np.stack([s[4] for s in slices])
    spacing = None if spacing0 is None or gap is None else (gap, *spacing0)
    uids = [str(s[5].get("SOPInstanceUID") or "") for s in slices]
    return Volume(volume, None if spacing is None else _check_spacing(spacing, site, folder)), uids


# --------------------------------------------------------------------------- sites


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for s in suffixes:
        if lower.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def _named(folder: Path, site: str, what: str, dicom: bool) -> dict[str, Path]:
    """The volumes of ``folder`` by name: NIfTI files, or (``dicom``) series folders and
    DICOM files. Two entries of one name are an error."""
    if not folder.is_dir():
        raise DataError(f"site '{site}': {what} folder '{folder}' not found")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if is_hidden(p):
            continue
        if dicom:
            if p.name.upper() == "DICOMDIR":
                continue
            name = p.name if p.is_dir() else (_strip(p.name, DICOM_SUFFIXES) or p.name)
        else:
            name = _strip(p.name, NIFTI_SUFFIXES) if p.is_file() else None
        if name is None:
            continue
        if name in out:
            raise DataError(f"site '{site}': {what} '{out[name].name}' and '{p.name}' in '{folder}' share the name '{name}'")
        out[name] = p
    return out


def _match(images: dict[str, Path], masks: dict[str, Path], fs, site: str) -> list[tuple[str, Path, Path]]:
    names = match_names(images, masks, site, fs.images, fs.masks, "image volumes")
    return [(n, images[n], masks[n]) for n in names]


def _as_3d(vol: Volume, source: Path, site: str) -> Volume:
    """The volume with three spatial axes (trailing size-1 axes dropped)."""
    array, spacing = vol.array, vol.spacing
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
        spacing = None if spacing is None else spacing[: array.ndim]
    if array.ndim != 3:
        raise UnreadableFile(site, source, f"array of shape {vol.array.shape} is not a 3D volume")
    return Volume(array, spacing, vol.affine)


def _load_image(source: Path, fmt: str, site: str) -> tuple[Volume, list[tuple[str, int | None]]]:
    """An image volume; a single-frame DICOM file becomes a volume of one slice (slice
    spacing from SpacingBetweenSlices or SliceThickness). With it, for DICOM, what each
    slice is: (SOP Instance UID, frame number of a multi-frame file, else None)."""
    if fmt == "nifti":
        return _as_3d(load_nifti(source, site), source, site), []
    if source.is_dir():
        vol, uids = _dicom_series(source, site)
        return vol, [(u, None) for u in uids]
    vol, ds = _load_dicom(source, site)
    uid = str(ds.get("SOPInstanceUID") or "")
    if vol.array.ndim == 2:
        gap = _frame_gap(ds)
        spacing = None if vol.spacing is None or gap is None else _check_spacing((gap, *vol.spacing), site, source)
        return Volume(vol.array[None], spacing), [(uid, None)]
    return vol, [(uid, k + 1) for k in range(vol.array.shape[0])]


def _volume_record(source: Path, mask_path: Path, fmt: str, site: str, num_classes: int,
                   segments: tuple[tuple[int, int], ...] | None = None):
    vol, refs = _load_image(source, fmt, site)
    if segments is not None:  # a DICOM SEG
        from medfed.data.readers.dicom_seg import read_seg_labels

        target = read_seg_labels(mask_path, refs, vol.array.shape, segments, site, source)
        return vol.array[None].astype(np.float32, copy=False), target, vol.spacing
    msk = load_nifti(mask_path, site)
    array = _fit_mask(vol.array.shape, msk.array, source, mask_path, site, dicom=fmt == "dicom")
    if fmt == "nifti" and array is msk.array and not np.allclose(vol.spacing, msk.spacing[:3], rtol=1e-3):
        raise DataError(f"site '{site}': image '{source}' spacing {vol.spacing} differs from its mask's {msk.spacing}")
    target = _label_values(array, mask_path, site, num_classes)
    return vol.array[None].astype(np.float32, copy=False), target, vol.spacing


@dataclass(frozen=True, eq=False)
class VolumeEntry:
    """One image volume (file or DICOM series folder) with its label volume (an index row;
    see :class:`~medfed.data.base.Entry`). ``segments``: for a DICOM SEG mask, its
    (segment number, class) pairs; None for a NIfTI label volume."""

    name: str
    split: str | None
    source: Path
    mask: Path
    format: str
    num_classes: int
    site: str
    target: None = None
    segments: tuple[tuple[int, int], ...] | None = None

    def read(self) -> Record:
        image, target, spacing = _volume_record(self.source, self.mask, self.format, self.site, self.num_classes,
                                                self.segments)
        return Record(self.name, image, target, spacing, self.split)

    def files(self) -> tuple[str, ...]:
        sources = sorted(str(p) for p in self.source.iterdir()) if self.source.is_dir() else [str(self.source)]
        return (*sources, str(self.mask))


def index_volume_sites(cfg: VolumesData, num_classes: int) -> list[SiteIndex]:
    """Every site's image volumes matched by name with their label volumes, in the job's
    site order, without reading a voxel; unmatched names are an error."""
    dicom = cfg.format == "dicom"
    out = []
    for site in cfg.sites:
        index = SiteIndex(site.name)
        for set_name, fs in site.file_sets().items():
            assert fs.masks is not None  # the schema requires a masks folder
            images = _named(fs.images, site.name, "image", dicom)
            if cfg.masks_format == "seg":
                _index_seg(index, cfg, set_name, images, fs.images, fs.masks, num_classes)
                continue
            masks = _named(fs.masks, site.name, "mask", dicom=False)
            for name, source, mask_path in _match(images, masks, fs, site.name):
                index.entries.append(VolumeEntry(
                    record_name(set_name, name), set_split(set_name), source, mask_path, cfg.format, num_classes, site.name
                ))
        out.append(index)
    return out


def _index_seg(index: SiteIndex, cfg: VolumesData, set_name: str, images: dict[str, Path], image_dir: Path,
               masks: Path, num_classes: int) -> None:
    """The entries of one file set whose masks are DICOM SEG files (see :mod:`.dicom_seg`)."""
    from medfed.data.readers.dicom_seg import RefusedEntry, match_seg_masks

    site, split = index.name, set_split(set_name)
    matches, refused = match_seg_masks(images, image_dir, masks, site, cfg.segment_map(), num_classes,
                                       cfg.on_bad_file == "skip")
    for m in matches:
        index.entries.append(VolumeEntry(record_name(set_name, m.name), split, images[m.name], m.seg, cfg.format,
                                         num_classes, site, segments=m.classes))
    for name, path, reason in refused:
        index.entries.append(RefusedEntry(record_name(set_name, name), split, site, path, reason))


def read_volume_sites(cfg: VolumesData, num_classes: int) -> list[SiteRecords]:
    """Every site's volumes with their label volumes, in the job's site order (see the
    module docstring). Raises DataError naming the site, the file and the problem."""
    return [require_records(read_entries(i, cfg.on_bad_file), "its volumes") for i in index_volume_sites(cfg, num_classes)]
