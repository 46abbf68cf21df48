"""One 2D DICOM image, as the ``folder`` source reads it: float32 (channels, H, W) in [0, 1].

What it accepts
---------------
A DICOM Part 10 file (the ``DICM`` marker at byte 128) holding one image: suffix
``.dcm``, ``.dicom`` or none (the marker decides, see :func:`is_dicom`). Multi-frame
files (NumberOfFrames > 1) are refused: one image per file. Any transfer syntax that
pydicom decodes with the plugins installed: uncompressed (little or big endian,
deflated), RLE, JPEG baseline and lossless, JPEG-LS, JPEG 2000 and HTJ2K (python-gdcm,
pylibjpeg with its openjpeg and rle plugins); 12-bit JPEG extended with the ``jpeg12``
extra (pylibjpeg-libjpeg).

Grey images (MONOCHROME1, MONOCHROME2), in this order:

1. the modality transform: RescaleSlope and RescaleIntercept (top level, else the
   functional groups of an enhanced file) or the Modality LUT Sequence (pydicom's
   ``apply_modality_lut``); Hounsfield units for CT;
2. the VOI transform onto [0, 1], the first that applies:
   - the job's ``data.dicom_window`` (center, width): ``center - width / 2`` ..
     ``center + width / 2`` onto 0..1 (LINEAR_EXACT), as the ``window`` preprocessing
     step does; it replaces the files' own windows and VOI LUTs;
   - the file's VOI LUT Sequence (first LUT, pydicom's ``apply_voi``), divided by the
     largest value of its entry bits (LUTDescriptor's third value);
   - the file's WindowCenter / WindowWidth (the first pair when several) with its
     VOILUTFunction (LINEAR by default, LINEAR_EXACT, SIGMOID), applied by pydicom's
     ``apply_windowing``; a width it refuses (e.g. < 1 for LINEAR) refuses the file;
   - no window: the range of values the stored bit depth can hold (BitsStored, signed
     or not, through the modality transform; 0..2**bits - 1 of a Modality LUT) onto
     0..1. Not the image's own min and max: files of one bit depth and rescale keep
     comparable intensities, as 16-bit PNGs do. A CT stored in 16 bits then spans a
     small part of [0, 1]: declare a ``dicom_window`` for CT. Float pixel data has no
     stored range and is refused without a window.

   Values outside [0, 1] are clipped (a window clips by design);
3. MONOCHROME1 is inverted (1 - v) so that high is bright, as in MONOCHROME2. The
   Presentation LUT is not applied.

Colour images: RGB, YBR_FULL and YBR_FULL_422 (converted to RGB by pydicom), YBR_ICT and
YBR_RCT (JPEG 2000; the decoder undoes the component transform), PALETTE COLOR (through
its palette, pydicom's ``apply_color_lut``). Values are divided by the largest value of
BitsStored (of the palette's entry bits for PALETTE COLOR); no modality or VOI LUT, no
window. ``channels: 3`` gives R, G, B; ``channels: 1`` the luma 0.299 R + 0.587 G +
0.114 B (the weights of Pillow's ``L``, not rounded to 8 bits). A grey image is repeated
in the three channels when 3 are asked. Other photometric interpretations are refused.

Errors: every refusal is a :class:`DicomUnreadable` holding the reason, which
:func:`medfed.data.readers.folder.read_image` turns into an ``UnreadableFile`` naming the
site and the file. Reasons: not DICOM, header damaged or truncated, no pixel data,
multi-frame, unsupported transfer syntax (with the plugin to install when pydicom has
one), pixel data truncated or not decodable, unsupported photometric interpretation,
invalid window, NaN or Inf.

Privacy: reasons are built from technical attributes only (transfer syntax, photometric
interpretation, frames, bit depth, window; ``read_image`` adds the site and the path).
pydicom's own messages are passed on only from pixel decoding, with every text value of
the header (names, IDs, dates, accession numbers, ...) blanked out; a header that cannot
be parsed is named by the exception's type alone. Reasons reach the site summary and the
server, so nothing that identifies a patient may be in them. pydicom's warnings (which
may quote header values) are silenced while a file is read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfed.data.readers.dicom_common import modality_range, modality_transform, scrub

if TYPE_CHECKING:
    from medfed.config import DicomWindow

DICOM_SUFFIXES = (".dcm", ".dicom")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_RGB = ("RGB", "YBR_ICT", "YBR_RCT")  # ICT/RCT: the JPEG 2000 decoder gives RGB
_YBR = ("YBR_FULL", "YBR_FULL_422")
_LUMA = np.array([0.299, 0.587, 0.114])


class DicomUnreadable(Exception):
    """A DICOM file this reader refuses; the message is the reason (technical only)."""

    @property
    def reason(self) -> str:
        return str(self)


def is_dicom(path: Path | str) -> bool:
    """True for a ``.dcm``/``.dicom`` file, or a file whose 132-byte preamble ends with
    ``DICM`` (DICOM exports often have no suffix); False when it cannot be opened."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_dicom_image(path: Path, channels: int, window: DicomWindow | None = None) -> np.ndarray:
    """float32 (channels, H, W) in [0, 1] from one DICOM file (see the module docstring).
    ``window`` replaces the file's VOI windows. Raises :class:`DicomUnreadable`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
        ds = _dataset(path)
        try:
            return _image(ds, channels, window)
        except DicomUnreadable:
            raise
        except Exception as e:  # pydicom and its plugins raise many types for odd files
            raise _refuse(ds, f"cannot be read as a DICOM image ({type(e).__name__}: {e})") from None


def _dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomUnreadable("not a DICOM file (no 'DICM' marker at byte 128 of a Part 10 file)") from None
    except Exception as e:  # the message may quote header bytes: name the type only
        raise DicomUnreadable(f"the DICOM header is damaged or truncated ({type(e).__name__})") from None


def _refuse(ds, reason: str) -> DicomUnreadable:
    return DicomUnreadable(scrub(reason, ds))


def _decoder(ds):
    """The pydicom decoder of the file's transfer syntax, or a refusal naming it."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not syntax:
        raise DicomUnreadable("its file meta information has no transfer syntax UID")
    named = f"transfer syntax '{syntax.name}' ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomUnreadable(
            f"unsupported {named}: pydicom has no decoder for it; convert the file to an "
            "uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 transfer syntax"
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pydicom pixel data plugin"
        raise DicomUnreadable(f"unsupported {named}: no decoder plugin installed; install one of: {needs}")
    return decoder


def _decode(ds) -> tuple[np.ndarray, dict]:
    decoder = _decoder(ds)
    try:
        return decoder.as_array(ds, raw=False)
    except Exception as e:
        msg = str(e)
        if isinstance(e, EOFError) or "less than expected" in msg:
            reason = f"the pixel data is truncated ({msg})"
        else:
            reason = f"the pixel data cannot be decoded ({type(e).__name__}: {msg})"
            if decoder.missing_dependencies:
                reason += f"; plugins not installed: {'; '.join(decoder.missing_dependencies)}"
        raise _refuse(ds, reason) from None


def _image(ds, channels: int, window: DicomWindow | None) -> np.ndarray:
    if not any(k in ds for k in _PIXEL_KEYWORDS):  # pydicom stops quietly where a file is cut short
        sop = ds.get("SOPClassUID")
        what = f"a '{sop.name}' object" if sop else "no SOP class"
        raise DicomUnreadable(
            f"holds no pixel data ({what}; a file cut short before its pixel data reads the same); "
            "only DICOM images can be read"
        )
    frames = ds.get("NumberOfFrames")
    try:
        frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise DicomUnreadable(f"NumberOfFrames {str(frames)[:16]!r} is not a whole number") from None
    if frames > 1:
        raise DicomUnreadable(f"holds {frames} frames (a multi-frame file); give one image per file")
    arr, meta = _decode(ds)
    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation") or "")
    if photometric in _GREY and arr.ndim == 2:
        grey = _grey(ds, arr, meta, photometric == "MONOCHROME1", window)
        return grey[None] if channels == 1 else np.repeat(grey[None], 3, axis=0)
    if (photometric in _RGB or photometric in _YBR or photometric == "PALETTE COLOR") and arr.ndim in (2, 3):
        rgb = _rgb(ds, arr, meta, photometric)
        if rgb.ndim == 3 and rgb.shape[-1] == 3:
            if channels == 3:
                return np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32)
            return (rgb @ _LUMA).astype(np.float32)[None]
    raise DicomUnreadable(
        f"photometric interpretation '{photometric}' with pixel array {arr.shape} is not supported; "
        "grey (MONOCHROME1/2), RGB, YBR_FULL(_422), YBR_ICT/RCT and PALETTE COLOR images are read"
    )


def _rgb(ds, arr: np.ndarray, meta: dict, photometric: str) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] of a colour image."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb, bits = apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        if photometric in _YBR:  # pydicom converts these when it decodes; kept for safety
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        rgb, bits = arr, int(meta.get("bits_stored") or ds.BitsStored)
    return np.clip(rgb.astype(np.float64) / (2.0**bits - 1), 0.0, 1.0)


def _grey(ds, arr: np.ndarray, meta: dict, invert: bool, window: DicomWindow | None) -> np.ndarray:
    """(H, W) float32 in [0, 1] of a grey image: modality, VOI, MONOCHROME1 inversion."""
    values = modality_transform(ds, arr)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DicomUnreadable(f"{bad} pixel value(s) are NaN or Inf after the modality transform")
    if window is not None:
        out = _windowed(values, *window.center_width, "LINEAR_EXACT")
    elif _has_voi_lut(ds):
        out = _voi_lut(values, ds)
    elif (file_window := _file_window(ds)) is not None:
        try:
            out = _windowed(values, *file_window)
        except ValueError as e:  # pydicom's checks of the width and the function
            raise DicomUnreadable(
                f"its VOI window cannot be applied ({e}); set data.dicom_window to replace it"
            ) from None
    elif arr.dtype.kind == "f":
        raise DicomUnreadable(
            "holds float pixel data, which has no stored range, and no window; set data.dicom_window"
        )
    else:
        bits = int(meta.get("bits_stored") or ds.BitsStored)
        signed = int(meta.get("pixel_representation", ds.get("PixelRepresentation", 0)) or 0) == 1
        low, high = modality_range(ds, bits, signed)
        out = (values.astype(np.float64) - low) / (high - low) if high > low else np.zeros(values.shape)
    out = np.clip(out, 0.0, 1.0)
    return (1.0 - out if invert else out).astype(np.float32)


def _windowed(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """pydicom's ``apply_windowing`` of (center, width, function), mapped onto 0..1: the
    window is handed over in a small dataset whose stored range is 0..1 (1 bit,
    unsigned, no rescale), which is the output range pydicom maps a window onto."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 1
    view.PixelRepresentation = 0
    view.WindowCenter = float(center)
    view.WindowWidth = float(width)
    view.VOILUTFunction = function
    return apply_windowing(values.astype(np.float64), view)


def _file_window(ds) -> tuple[float, float, str] | None:
    """The file's first (WindowCenter, WindowWidth, VOILUTFunction), None without one."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    try:
        first = [float(v if isinstance(v, (str, bytes)) or not hasattr(v, "__getitem__") else v[0])
                 for v in (center, width)]
    except (TypeError, ValueError, IndexError):
        raise DicomUnreadable("its WindowCenter/WindowWidth are not numbers; set data.dicom_window") from None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    return first[0], first[1], function


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _voi_lut(values: np.ndarray, ds) -> np.ndarray:
    """The file's first VOI LUT (pydicom's ``apply_voi``) divided by its largest entry.
    Inputs are rounded and held to the LUT's input range first, as the standard maps
    values below (above) it to the first (last) entry."""
    from pydicom.pixels import apply_voi

    entries, first, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    entries = entries or 65536
    inputs = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
    return apply_voi(inputs, ds).astype(np.float64) / (2.0**bits - 1)
