"""Medical volumes: NIfTI (nibabel) and DICOM (pydicom), with their voxel spacing.

Arrays keep the file's voxel order; ``affine`` (NIfTI) maps voxel indices to millimetres,
so orientation is kept, not guessed. DICOM intensities are rescaled with the file's slope
and intercept (Hounsfield units for CT). Every error names the site, the file or series
and the problem. Not yet reachable from job files (issue 3 wires readers into jobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.core.errors import DataError


@dataclass(frozen=True)
class Volume:
    """``array``: float32 voxels; ``spacing``: millimetres per voxel along each array axis;
    ``affine``: 4x4 voxel-to-world matrix when the format has one, else None."""

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None


def _check_spacing(spacing: tuple[float, ...], where: str) -> tuple[float, ...]:
    if len(spacing) == 0 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise DataError(f"{where}: voxel spacing must be positive, got {tuple(round(float(s), 6) for s in spacing)}")
    return tuple(float(s) for s in spacing)


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
    """A NIfTI image (``.nii`` or ``.nii.gz``) with its spacing and affine."""
    import nibabel as nib

    where = f"site '{site}': '{path}'"
    if not Path(path).is_file():
        raise DataError(f"{where} not found")
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for damaged files (gzip, EOF, header errors)
        raise DataError(f"{where} is not a readable NIfTI file ({type(e).__name__}: {e})") from None
    raw = _raw_spacing(Path(path), array.ndim)
    spacing = _check_spacing(raw if raw is not None else tuple(img.header.get_zooms()[: array.ndim]), where)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise DataError(f"{where}: {bad} voxel value(s) are NaN or Inf")
    return Volume(array, spacing, np.asarray(img.affine))


def load_nifti_pair(image: Path, mask: Path, site: str, num_classes: int) -> tuple[Volume, np.ndarray]:
    """An image volume and its label volume (int64 class indices in 0..num_classes-1),
    which must share the image's shape and spacing."""
    img, msk = load_nifti(image, site), load_nifti(mask, site)
    if img.array.shape != msk.array.shape:
        raise DataError(f"site '{site}': image '{Path(image).name}' is {img.array.shape} but its mask is {msk.array.shape}")
    if not np.allclose(img.spacing, msk.spacing, rtol=1e-3):
        raise DataError(f"site '{site}': image '{Path(image).name}' spacing {img.spacing} differs from its mask's {msk.spacing}")
    labels = np.rint(msk.array).astype(np.int64)
    if not np.allclose(labels, msk.array) or labels.min() < 0 or labels.max() >= num_classes:
        found = sorted(np.unique(msk.array).tolist())[:6]
        raise DataError(f"site '{site}': mask '{Path(mask).name}' holds values {found}, expected class indices 0..{num_classes - 1}")
    return img, labels


def _read_dicom(path: Path, site: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, EOFError, TypeError) as e:
        raise DataError(f"site '{site}': '{path}' is not a readable DICOM image ({type(e).__name__}: {e})") from None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return ds, pixels.astype(np.float32) * slope + intercept


def load_dicom(path: Path, site: str) -> Volume:
    """One DICOM file: a 2D image (rows, cols), or a multi-frame volume (frames, rows, cols)."""
    if not Path(path).is_file():
        raise DataError(f"site '{site}': '{path}' not found")
    ds, array = _read_dicom(Path(path), site)
    row, col = (float(v) for v in getattr(ds, "PixelSpacing", (1.0, 1.0)))
    where = f"site '{site}': '{path}'"
    if array.ndim == 3:
        thickness = float(getattr(ds, "SpacingBetweenSlices", getattr(ds, "SliceThickness", 1.0)) or 0)
        return Volume(array, _check_spacing((thickness, row, col), where))
    return Volume(array, _check_spacing((row, col), where))


def load_dicom_series(folder: Path, site: str) -> Volume:
    """The single-frame DICOM files of one folder as a (slices, rows, cols) volume, sorted
    by position along the slice normal; slice spacing from the positions. Files that
    disagree in size, pixel spacing or orientation, or two slices at one position, are an
    error naming the series."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not files:
        raise DataError(f"site '{site}': DICOM series '{folder}' has no files")
    slices = []
    for f in files:
        ds, array = _read_dicom(f, site)
        try:
            orient = np.array([float(v) for v in ds.ImageOrientationPatient])
            pos = np.array([float(v) for v in ds.ImagePositionPatient])
        except AttributeError:
            raise DataError(f"site '{site}': '{f.name}' in series '{folder}' lacks its position or orientation") from None
        slices.append((orient, pos, tuple(float(v) for v in ds.PixelSpacing), array))
    orient0, _, spacing0, array0 = slices[0]
    for orient, _, spacing, array in slices[1:]:
        if array.shape != array0.shape or not np.allclose(spacing, spacing0) or not np.allclose(orient, orient0, atol=1e-4):
            raise DataError(
                f"site '{site}': DICOM series '{folder}' has inconsistent geometry "
                f"(size {array.shape} vs {array0.shape}, spacing {spacing} vs {spacing0}, or orientation)"
            )
    normal = np.cross(orient0[:3], orient0[3:])
    slices.sort(key=lambda s: float(np.dot(normal, s[1])))
    depths = np.array([float(np.dot(normal, s[1])) for s in slices])
    gaps = np.diff(depths)
    where = f"site '{site}': DICOM series '{folder}'"
    if len(gaps) and (np.any(gaps <= 1e-6) or not np.allclose(gaps, gaps[0], rtol=1e-2)):
        raise DataError(f"{where} has uneven or repeated slice positions (gaps {np.round(gaps, 3).tolist()[:5]})")
    thickness = float(gaps[0]) if len(gaps) else 1.0
    volume = np.stack([s[3] for s in slices])
    return Volume(volume, _check_spacing((thickness, *spacing0), where))
