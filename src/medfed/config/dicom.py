"""DICOM-specific settings of the file sources: the VOI window of 2D DICOM images in a
``folder`` job (:class:`DicomWindow`), and the mapping of DICOM SEG segments to classes in a
``volumes`` job (``segments``)."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Any, Literal, Union

from pydantic import Field, model_validator

from medfed.config.transforms import WINDOW_PRESETS
from medfed.core.schema import Frozen, Real

class DicomWindow(Frozen):
    """The VOI window put on every grey DICOM image of a folder job, in place of the
    files' own windows and VOI LUTs: values from ``center - width / 2`` to
    ``center + width / 2``, after the modality transform (Hounsfield units for CT), map
    linearly onto [0, 1]; values outside are clipped. Give ``center`` and ``width``, or a
    CT ``preset`` with the values of the ``window`` preprocessing step (center / width):
    ``ct_abdomen`` 40 / 400, ``ct_liver`` 75 / 200, ``ct_lung`` -600 / 1500,
    ``ct_mediastinum`` 50 / 350, ``ct_brain`` 40 / 80, ``ct_bone`` 300 / 1500."""

    center: Real | None = None
    width: Real | None = Field(None, gt=0)
    preset: Literal["ct_abdomen", "ct_liver", "ct_lung", "ct_mediastinum", "ct_brain", "ct_bone"] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> "DicomWindow":
        numbers = [n for n in ("center", "width") if getattr(self, n) is not None]
        if self.preset is not None and numbers:
            raise ValueError(f"give a preset or center and width, not both (got preset and {' and '.join(numbers)})")
        if self.preset is None and len(numbers) != 2:
            raise ValueError("give center and width (e.g. {center: 40, width: 400}), or a preset (e.g. ct_lung)")
        return self

    @property
    def center_width(self) -> tuple[float, float]:
        """(center, width) of the window, from the preset or as given."""
        if self.preset is not None:
            low, high = WINDOW_PRESETS[self.preset]
            return (low + high) / 2, high - low
        return float(self.center), float(self.width)  # type: ignore[arg-type]


def class_key(v: Any) -> int:
    """A key of ``segments``: a class index 1, 2, ... (JSON writes it as a string)."""
    try:
        k = int(v) if not isinstance(v, (bool, float)) else 0
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise ValueError(f"keys are class indices 1, 2, ... (0 is the background), got {v!r}")
    return k


def segment_refs(v: Any) -> Any:
    """A value of ``segments``: one segment or a non-empty list of them."""
    items = v if isinstance(v, list) else [v]
    if not items:
        raise ValueError("lists no segment")
    for x in items:
        if isinstance(x, bool) or not ((isinstance(x, int) and x >= 1) or (isinstance(x, str) and x.strip())):
            raise ValueError(f"a segment is its label (text) or its number (1, 2, ...), got {x!r}")
    return v


# A DICOM SEG segment: its SegmentLabel (matched exactly) or its SegmentNumber.
SegmentRef = Union[int, str]
