"""Every DICOM file with pixel data in pydicom's own test data, read by the folder
source's reader (``medfed.data.readers.folder.read_image``), and what became of it.

Usage: python benchmarks/dicom_corpus.py [--list]

Files: those that ship in the installed pydicom's ``data/test_files`` (sub-folders
included), those of a locally installed external source (pydicom-data), and those that
pydicom fetches from the network on demand, taken only when already in pydicom's cache
(``~/.pydicom/data``); nothing is downloaded. A fetched file not in the cache is counted
"not available" (whether it holds pixel data is not known without it). A file "has pixel
data" when pydicom (``dcmread(force=True)``) finds Pixel Data, Float Pixel Data or
Double Float Pixel Data in it.

Each file is read with ``channels: 1``, and a colour file also with ``channels: 3``:

  read       pixels equal, within 1e-5, to a reference computed here with pydicom's own
             functions: ``Dataset.pixel_array`` (YBR converted to RGB),
             ``apply_modality_lut``, ``apply_voi_lut`` (the file's first window or VOI
             LUT) scaled from pydicom's output range, else the stored bit depth's range
             through the rescale; clipped to [0, 1]; MONOCHROME1 inverted;
             ``apply_color_lut`` for palettes; luma for grey.
  refused    an UnreadableFile whose text names the file, grouped by reason;
  multi      a multi-frame file refused (one image per file);
  mismatch   read, but not equal to the reference, or refused without naming the file
             (a bug: should be 0).

The test tests/data/readers/test_dicom_corpus.py runs the same sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOLERANCE = 1e-5
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
REASONS = (  # (group, text the reason starts with or holds), first match wins
    ("not DICOM", "not a DICOM file"),
    ("header damaged or truncated", "the DICOM header is damaged"),
    ("no transfer syntax", "no transfer syntax UID"),
    ("unsupported transfer syntax", "unsupported transfer syntax"),
    ("pixel data truncated", "the pixel data is truncated"),
    ("pixel data not decodable", "the pixel data cannot be decoded"),
    ("photometric interpretation", "photometric interpretation"),
    ("window", "window"),
    ("bad header value", "is not a whole number"),
)


@dataclass
class Outcome:
    file: str
    syntax: str
    photometric: str
    outcome: str  # read, refused, multi, mismatch
    detail: str = ""


def candidate_files() -> tuple[list[Path], list[str]]:
    """(available files, names of fetched files not in pydicom's cache)."""
    from pydicom.data.data_manager import (
        DATA_ROOT,
        external_data_sources,
        online_test_file_dummy_paths,
    )

    root = Path(DATA_ROOT) / "test_files"
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    for source in external_data_sources().values():  # locally installed packages only
        files += [Path(p) for p in source.get_paths("**/*", 0)]
    cache = Path.home() / ".pydicom" / "data"  # pydicom's download cache
    missing = []
    for name in sorted(set(online_test_file_dummy_paths().values())):
        if (cache / name).is_file():
            files.append(cache / name)
        else:
            missing.append(name)
    return sorted(set(files)), missing


def with_pixels(path: Path):
    """The dataset when the file is DICOM with pixel data, else None."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        return None
    return ds if any(k in ds for k in PIXEL_KEYWORDS) else None


def _window_range(ds) -> tuple[float, float]:
    """The range pydicom's apply_windowing maps a window onto (its own rule)."""
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif int(ds.PixelRepresentation) == 0:
        low, high = 0.0, 2.0 ** int(ds.BitsStored) - 1
    else:
        low, high = -(2.0 ** (int(ds.BitsStored) - 1)), 2.0 ** (int(ds.BitsStored) - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return low, high


def _stored_range(ds) -> tuple[float, float]:
    """The no-window rule: the stored bit depth's range through the modality transform."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    bits = int(ds.BitsStored)
    ends = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.PixelRepresentation) else (0, 2**bits - 1)
    mapped = np.sort(np.asarray(apply_modality_lut(np.array(ends, np.float64), ds), np.float64))
    return float(mapped[0]), float(mapped[1])


def reference(path: Path, channels: int) -> np.ndarray:
    """What the reader should give, computed with pydicom's functions."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    pi = str(ds.PhotometricInterpretation)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        values = np.asarray(apply_modality_lut(arr, ds), np.float64)
        seq = ds.get("VOILUTSequence")
        if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
            entries, first, bits = (int(v) for v in seq[0].LUTDescriptor)
            inputs = np.clip(np.rint(values), first, first + (entries or 65536) - 1).astype(np.int64)
            out = apply_voi_lut(inputs, ds) / (2.0**bits - 1)
        elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
            low, high = _window_range(ds)
            out = (apply_voi_lut(values, ds) - low) / (high - low)
        else:
            low, high = _stored_range(ds)
            out = (values - low) / (high - low)
        out = np.clip(out, 0, 1)
        grey = 1 - out if pi == "MONOCHROME1" else out
        return (grey[None] if channels == 1 else np.repeat(grey[None], 3, 0)).astype(np.float32)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds) / (2.0 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
    else:  # RGB, and YBR that pixel_array converted to RGB
        rgb = arr / (2.0 ** int(ds.BitsStored) - 1)
    rgb = np.clip(rgb, 0, 1)
    if channels == 1:
        return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])[None].astype(np.float32)
    return np.moveaxis(rgb, -1, 0).astype(np.float32)


def reason_group(reason: str) -> str:
    for group, text in REASONS:
        if text in reason:
            return group
    return "other"


def classify(path: Path, ds) -> Outcome:
    """Read ``path`` as the folder source does and compare with :func:`reference`."""
    from medfed.data.readers.folder import UnreadableFile, read_image

    syntax = getattr(getattr(ds, "file_meta", None), "get", lambda _k: None)("TransferSyntaxUID")
    pi = str(ds.get("PhotometricInterpretation", "") or "")
    out = Outcome(str(path), syntax.name if syntax else "(none)", pi or "(none)", "read")
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1 or pi == "PALETTE COLOR"
    for channels in (1, 3) if colour else (1,):
        try:
            got = read_image(path, channels, "corpus")
        except UnreadableFile as e:
            named = str(path) in str(e)
            if not named:
                out.outcome, out.detail = "mismatch", f"refusal does not name the file: {e}"
            elif "multi-frame" in e.reason:
                out.outcome, out.detail = "multi", e.reason
            else:
                out.outcome, out.detail = "refused", f"{reason_group(e.reason)}: {e.reason}"
            return out
        try:
            want = reference(path, channels)
        except Exception as e:
            out.outcome, out.detail = "mismatch", f"read, but the reference failed ({type(e).__name__}: {e})"
            return out
        if got.shape != want.shape or got.dtype != np.float32:
            out.outcome, out.detail = "mismatch", f"channels {channels}: shape {got.shape} vs {want.shape}"
            return out
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        if not np.isfinite(got).all() or diff > TOLERANCE or got.min() < 0 or got.max() > 1:
            out.outcome, out.detail = "mismatch", f"channels {channels}: max difference {diff:.3g}"
            return out
        out.detail = f"{got.shape[1]}x{got.shape[2]}, max difference {diff:.1e}"
    return out


def sweep() -> tuple[list[Outcome], list[str], int]:
    """(outcome of every available file with pixel data, unavailable names, number of
    available files without pixel data or not DICOM)."""
    files, missing = candidate_files()
    outcomes, without = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            ds = with_pixels(path)
            if ds is None:
                without += 1
                continue
            outcomes.append(classify(path, ds))
    return outcomes, missing, without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every file's outcome")
    args = parser.parse_args()
    import pydicom

    outcomes, missing, without = sweep()
    root = os.path.commonpath([o.file for o in outcomes]) if outcomes else ""
    print(f"pydicom {pydicom.__version__}; plugins: {', '.join(_plugins())}")
    if args.list:
        print("| file | transfer syntax | photometric | outcome | detail |\n| --- | --- | --- | --- | --- |")
        for o in outcomes:
            print(f"| {os.path.relpath(o.file, root)} | {o.syntax} | {o.photometric} | {o.outcome} | {o.detail} |")
    counts = Counter(o.outcome for o in outcomes)
    reasons = Counter(o.detail.split(":")[0] for o in outcomes if o.outcome == "refused")
    print("\n| outcome | files |\n| --- | --- |")
    for name in ("read", "refused", "multi", "mismatch"):
        print(f"| {name} | {counts.get(name, 0)} |")
    for group, n in sorted(reasons.items()):
        print(f"| refused: {group} | {n} |")
    print(f"| total with pixel data | {len(outcomes)} |")
    print(f"| not available (fetched by pydicom on demand, not downloaded) | {len(missing)} |")
    print(f"| available, without pixel data or not DICOM (not counted) | {without} |")
    for o in outcomes:
        if o.outcome in ("refused", "mismatch"):
            print(f"{o.outcome}: {os.path.relpath(o.file, root)} [{o.syntax}]: {o.detail}")
    sys.exit(1 if counts.get("mismatch") else 0)


def _plugins() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "python-gdcm"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return out or ["none"]


if __name__ == "__main__":
    main()
