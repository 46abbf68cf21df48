"""The job's ``transforms`` section: preprocessing steps (applied once to every image when
the data is read), augmentation steps (applied to every training batch) and the training
patch size, each step a MONAI transform named in :mod:`medfed.data.transforms`."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

import math
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Field, field_validator, model_validator

from medfed.config.limits import MAX_SIDE, MAX_VOXELS
from medfed.core.schema import Count, Frozen, Real

# Intensity windows (level +- width / 2) in Hounsfield units, for CT.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct_abdomen": (-160.0, 240.0),   # level 40, width 400
    "ct_liver": (-25.0, 175.0),      # level 75, width 200
    "ct_lung": (-1350.0, 150.0),     # level -600, width 1500
    "ct_mediastinum": (-125.0, 225.0),  # level 50, width 350
    "ct_brain": (0.0, 80.0),         # level 40, width 80
    "ct_bone": (-450.0, 1050.0),     # level 300, width 1500
}


def _fits_voxels(size: list[int]) -> list[int]:
    if math.prod(size) > MAX_VOXELS:
        raise ValueError(f"{size} is {math.prod(size):,} pixels; an image may have at most {MAX_VOXELS:,}")
    return size


# An image or patch size, 2 or 3 sides, each 1..MAX_SIDE pixels, MAX_VOXELS in all.
ImageSize = Annotated[
    list[Annotated[Count, Field(ge=1, le=MAX_SIDE)]], Field(min_length=2, max_length=3), AfterValidator(_fits_voxels)
]


class WindowStep(Frozen):
    """Clip intensities to [``min``, ``max``] (or a CT ``preset``) and scale them to [0, 1]."""

    name: Literal["window"]
    min: Real | None = None
    max: Real | None = None
    preset: Literal["ct_abdomen", "ct_liver", "ct_lung", "ct_mediastinum", "ct_brain", "ct_bone"] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "WindowStep":
        if (self.preset is None) == (self.min is None or self.max is None):
            if self.preset is None:
                raise ValueError("window: give min and max, or a preset")
            raise ValueError("window: give a preset or min and max, not both")
        if self.preset is None and self.max <= self.min:  # type: ignore[operator]
            raise ValueError(f"window: max must be > min, got min {self.min:g}, max {self.max:g}")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        return WINDOW_PRESETS[self.preset] if self.preset is not None else (self.min, self.max)  # type: ignore[return-value]


class NormalizeStep(Frozen):
    """``zscore``: zero mean, unit variance per image (over ``nonzero`` voxels only if set);
    ``minmax``: scaled to [0, 1] per image."""

    name: Literal["normalize"]
    mode: Literal["zscore", "minmax"] = "zscore"
    nonzero: bool = False


class SpacingStep(Frozen):
    """Resample volumes to ``pixdim`` millimetres per voxel (image trilinear, mask nearest)."""

    name: Literal["spacing"]
    pixdim: list[Real] = Field(min_length=2, max_length=3)

    @field_validator("pixdim")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not (x > 0) for x in v):
            raise ValueError(f"must be > 0, got {v}")
        return v


class CropOrPadStep(Frozen):
    """Centre-crop or zero-pad every image (and mask) to ``size``."""

    name: Literal["crop_or_pad"]
    size: ImageSize


class ResizeStep(Frozen):
    """Resize every image to ``size`` (image bilinear/trilinear, mask nearest)."""

    name: Literal["resize"]
    size: ImageSize


PreprocessStep = Annotated[
    Union[WindowStep, NormalizeStep, SpacingStep, CropOrPadStep, ResizeStep], Field(discriminator="name")
]


class FlipStep(Frozen):
    """Flip along each spatial axis in ``axes`` (0 = first spatial axis) with chance ``prob``."""

    name: Literal["flip"]
    axes: list[Annotated[Count, Field(ge=0, le=2)]] = Field(default_factory=lambda: [0], min_length=1, max_length=3)
    prob: Real = Field(0.5, ge=0, le=1)


class Rotate90Step(Frozen):
    """Rotate by a random multiple of 90 degrees in the plane of the last two axes."""

    name: Literal["rotate90"]
    prob: Real = Field(0.5, ge=0, le=1)


class RotateStep(Frozen):
    """Rotate by an angle drawn in [-``degrees``, ``degrees``] (in-plane for 2D, about each
    axis for 3D)."""

    name: Literal["rotate"]
    degrees: Real = Field(15.0, gt=0, le=180)
    prob: Real = Field(0.5, ge=0, le=1)


class ZoomStep(Frozen):
    """Zoom by a factor drawn in [``min``, ``max``], keeping the image size."""

    name: Literal["zoom"]
    min: Real = Field(0.9, gt=0)
    max: Real = Field(1.1, gt=0)
    prob: Real = Field(0.5, ge=0, le=1)


class IntensityStep(Frozen):
    """Intensity jitter: multiply by ``1 + u``, u in [-``scale``, ``scale``], then add a
    shift drawn in [-``shift``, ``shift``]."""

    name: Literal["intensity"]
    scale: Real = Field(0.1, ge=0)
    shift: Real = Field(0.1, ge=0)
    prob: Real = Field(0.5, ge=0, le=1)


class NoiseStep(Frozen):
    """Additive Gaussian noise of standard deviation up to ``std``."""

    name: Literal["noise"]
    std: Real = Field(0.05, gt=0)
    prob: Real = Field(0.3, ge=0, le=1)


class ContrastStep(Frozen):
    """Gamma contrast change with gamma drawn in [``min``, ``max``]."""

    name: Literal["contrast"]
    min: Real = Field(0.7, gt=0)
    max: Real = Field(1.5, gt=0)
    prob: Real = Field(0.3, ge=0, le=1)


AugmentStep = Annotated[
    Union[FlipStep, Rotate90Step, RotateStep, ZoomStep, IntensityStep, NoiseStep, ContrastStep],
    Field(discriminator="name"),
]


class TransformsConfig(Frozen):
    """Preprocessing (applied once to every image when the data is read, in order) and
    augmentation (applied to every training batch, random, seeded by the round), both
    built from MONAI transforms. ``patch``: train on random crops of this size; evaluation
    then runs sliding-window inference over the whole image or volume."""

    preprocess: list[PreprocessStep] = Field(default_factory=list)
    augment: list[AugmentStep] = Field(default_factory=list)
    patch: ImageSize | None = None

    @field_validator("patch")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(x < 4 for x in v):
            raise ValueError(f"patch sizes must be >= 4, got {v}")
        return v

