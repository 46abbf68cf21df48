"""DICOM helpers shared by the 2D image reader (:mod:`.dicom_image`) and the volume
reader (:mod:`.volumes`): attributes of enhanced multi-frame files and the modality
transform. pydicom is imported by the callers, only when a DICOM file is read."""

from __future__ import annotations

import numpy as np


def functional_group(ds, sequence: str, attr: str, frame: int | None = None):
    """``attr`` from the functional groups of an enhanced multi-frame file: the frame's
    own group first (when ``frame`` is given), then the shared group; else None."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get(sequence)
        if items and attr in items[0]:
            return items[0].get(attr)
    return None


def _slope_intercept(ds, frame: int) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (top level, else the frame's functional groups);
    1 and 0 when absent."""
    slope = ds.get("RescaleSlope", functional_group(ds, "PixelValueTransformationSequence", "RescaleSlope", frame))
    intercept = ds.get(
        "RescaleIntercept", functional_group(ds, "PixelValueTransformationSequence", "RescaleIntercept", frame)
    )
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if slope == 0:
        raise ValueError("RescaleSlope is 0")
    return slope, intercept


def modality_transform(ds, pixels: np.ndarray) -> np.ndarray:
    """The modality transform of grey pixels (Hounsfield units for CT), float32: the
    Modality LUT Sequence through pydicom's ``apply_modality_lut``, else slope and
    intercept (top level, or per frame from the functional groups of enhanced files).
    ``pixels`` is one frame, any shape, or (frames, rows, cols)."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    out = pixels.astype(np.float32)
    multi = pixels.ndim == 3
    for i in range(pixels.shape[0] if multi else 1):
        slope, intercept = _slope_intercept(ds, i)
        view = out[i] if multi else out
        view *= np.float32(slope)
        view += np.float32(intercept)
    return out


def modality_range(ds, bits_stored: int, signed: bool) -> tuple[float, float]:
    """(low, high): the values a grey image of this bit depth can hold after the modality
    transform. A Modality LUT gives 0 .. 2**(its entry bits) - 1, as the DICOM standard
    and pydicom's windowing take it; slope and intercept map the stored range."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    slope, intercept = _slope_intercept(ds, 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return float(ends[0]), float(ends[1])


# the value representations of text a header holds: names, IDs, dates, free text
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "TM", "AS", "AE"}


WITHHELD = "details withheld: part of the header cannot be read, and the details could quote it"


def scrub(text: str, ds) -> str:
    """``text`` with every text value of the header (names, IDs, dates...) blanked out:
    what a refusal may say, since refusals reach the server and the report. When some
    element of the header cannot be read (so its value cannot be blanked), the details
    are withheld whole (:data:`WITHHELD`)."""
    try:
        elements = [ds[tag] for tag in list(ds.keys())]
        values = []
        for elem in elements:
            if elem.VR in _TEXT_VRS and elem.value is not None:
                values += list(elem.value) if elem.VM > 1 else [elem.value]
    except Exception:  # pydicom parses lazily: a damaged element fails only when read
        return WITHHELD
    for value in values:
        value = str(value).strip()
        if len(value) >= 3:
            text = text.replace(value, "<header value>")
    return " ".join(text.split())
