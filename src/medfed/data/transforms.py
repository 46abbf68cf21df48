"""Preprocessing and augmentation built from MONAI transforms.

:func:`build_preprocess` turns the job's ``transforms.preprocess`` steps into a function
applied once to every :class:`~medfed.data.base.Record` as the data is read
(deterministic). :func:`build_augment` turns ``transforms.augment`` and ``patch`` into an
:class:`Augmenter` applied to every training batch (random, seeded per call).

Conventions (shared by both):

* Images are float32 ``(C, *spatial)`` (a batch ``(B, C, *spatial)``); segmentation masks
  are int64 class indices ``(*spatial)`` (a batch ``(B, *spatial)``). Spatial transforms
  move image and mask together: image bilinear/trilinear, mask nearest neighbour, so a
  mask keeps its integer labels. Classification labels are never touched.
* Spatial axes are counted from 0 (the first axis after the channel).
* ``resize`` keeps the field of view, so the spacing it returns is scaled:
  ``new = old * old_size / new_size`` per axis (None stays None).
* ``spacing`` resamples by voxel extent (MONAI ``scale_extent=True``): (2, 2, 2) mm to
  (1, 1, 1) mm exactly doubles the shape.
* ``normalize`` ``zscore`` is per channel (over nonzero voxels when ``nonzero``);
  ``minmax`` scales the whole image (all channels together, so colours keep their
  balance) to [0, 1] and ignores ``nonzero``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Identityd,
    NormalizeIntensity,
    OneOf,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensity,
    ScaleIntensityRange,
    Spacing,
    SpatialPadd,
)
from monai.utils import convert_to_numpy

from medfed.config import (
    AugmentStep,
    ContrastStep,
    CropOrPadStep,
    FlipStep,
    IntensityStep,
    NoiseStep,
    NormalizeStep,
    PreprocessStep,
    ResizeStep,
    Rotate90Step,
    RotateStep,
    SpacingStep,
    WindowStep,
    ZoomStep,
)
from medfed.core.errors import DataError
from medfed.data.base import Record

__all__ = ["Augmenter", "Preprocess", "build_augment", "build_preprocess"]

# (record) -> record: one example preprocessed
Preprocess = Callable[[Record], Record]

# Working state of one record between preprocessing steps: image (C, *sp) float32, mask
# (1, *sp) float32 or None (classification), spacing or None.
_State = tuple[torch.Tensor, "torch.Tensor | None", "tuple[float, ...] | None"]
_Op = Callable[[torch.Tensor, "torch.Tensor | None", "tuple[float, ...] | None", str], _State]


def _linear(dims: int) -> str:
    """torch.nn.functional.interpolate's linear mode for ``dims`` spatial axes."""
    return "bilinear" if dims == 2 else "trilinear"


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MONAI returns MetaTensor when it tracks metadata)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    return torch.as_tensor(x)


def _check_size(values: Sequence[Any], dims: int, where: str) -> None:
    if len(values) != dims:
        raise DataError(f"{where}: needs {dims} sizes for {dims}D data, got {list(values)}")


# --------------------------------------------------------------------------- preprocessing


def _window_op(step: WindowStep) -> _Op:
    lo, hi = step.bounds
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)

    def op(image, mask, spacing, name):
        return _plain(scale(image)), mask, spacing

    return op


def _normalize_op(step: NormalizeStep) -> _Op:
    if step.mode == "zscore":
        norm: Callable[[torch.Tensor], Any] = NormalizeIntensity(nonzero=step.nonzero, channel_wise=True)
    else:
        norm = ScaleIntensity(minv=0.0, maxv=1.0)

    def op(image, mask, spacing, name):
        return _plain(norm(image)), mask, spacing

    return op


def _spacing_op(step: SpacingStep, dims: int) -> _Op:
    pixdim = tuple(float(p) for p in step.pixdim)
    # float32 resampling grids: half the memory of MONAI's float64 default on large CTs
    kw = {"pixdim": pixdim, "padding_mode": "border", "scale_extent": True, "dtype": np.float32}
    image_tf = Spacing(mode="bilinear", **kw)
    mask_tf = Spacing(mode="nearest", **kw)

    def op(image, mask, spacing, name):
        if spacing is None:
            raise DataError(
                f"{name}: the spacing step resamples to {list(pixdim)} mm but this record has no voxel "
                "spacing (its file format records none); remove the spacing step, or use files that "
                "store spacing (NIfTI, DICOM)"
            )
        if len(spacing) != dims:
            raise DataError(f"{name}: spacing {list(spacing)} has {len(spacing)} values for {dims}D data")
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        image = _plain(image_tf(MetaTensor(image, affine=affine)))
        if mask is not None:
            mask = _plain(mask_tf(MetaTensor(mask, affine=affine)))
        return image, mask, pixdim

    return op


def _crop_or_pad_op(step: CropOrPadStep) -> _Op:
    tf = ResizeWithPadOrCrop(spatial_size=list(step.size), method="symmetric", mode="constant")

    def op(image, mask, spacing, name):
        return _plain(tf(image)), (None if mask is None else _plain(tf(mask))), spacing

    return op


def _resize_op(step: ResizeStep, dims: int) -> _Op:
    size = [int(s) for s in step.size]
    # Shrinking along every axis: area averaging (no aliasing, and ~40x cheaper than a
    # Gaussian pre-filter). Otherwise linear interpolation, with a Gaussian pre-filter
    # along the axes that shrink. The mask by nearest neighbour.
    shrink_tf = Resize(spatial_size=size, mode="area")
    image_tf = Resize(spatial_size=size, mode=_linear(dims), anti_aliasing=True)
    mask_tf = Resize(spatial_size=size, mode="nearest-exact")

    def op(image, mask, spacing, name):
        old = image.shape[1:]
        shrinking = all(int(n) <= int(o) for n, o in zip(size, old))
        image = _plain((shrink_tf if shrinking else image_tf)(image))
        if mask is not None:
            mask = _plain(mask_tf(mask))
        if spacing is not None and len(spacing) == dims:
            spacing = tuple(float(sp) * int(o) / int(n) for sp, o, n in zip(spacing, old, size))
        else:
            spacing = None
        return image, mask, spacing

    return op


def build_preprocess(steps: Sequence[PreprocessStep], dims: int, segmentation: bool) -> Preprocess:
    """The function that applies ``steps`` in order to one record (deterministic).

    ``window``: clip to the bounds and scale to [0, 1]. ``normalize``: per-channel z-score
    (over nonzero voxels if asked) or whole-image min-max to [0, 1]. ``spacing``: resample
    from ``record.spacing`` to ``pixdim`` (image linear, mask nearest) and set the new
    spacing; a record without spacing is a DataError naming it. ``crop_or_pad``: centre
    crop / zero pad image and mask. ``resize``: image by area averaging when every axis
    shrinks, else linear (anti-aliased along shrinking axes); mask nearest; the spacing is
    scaled to keep the field of view.

    The returned record has a float32 numpy image and, for segmentation, an int64 numpy
    mask of the image's spatial shape; a classification target is returned as is. Raises
    DataError (naming the step) when a size does not have ``dims`` values, and DataError
    naming the record when a record is not ``dims``-D or a step fails on it.
    """
    if dims not in (2, 3):
        raise DataError(f"preprocessing: data must be 2D or 3D, got {dims}D")
    ops: list[_Op] = []
    for i, step in enumerate(steps):
        where = f"transforms.preprocess[{i}] ({step.name})"
        if isinstance(step, WindowStep):
            ops.append(_window_op(step))
        elif isinstance(step, NormalizeStep):
            ops.append(_normalize_op(step))
        elif isinstance(step, SpacingStep):
            _check_size(step.pixdim, dims, where)
            ops.append(_spacing_op(step, dims))
        elif isinstance(step, CropOrPadStep):
            _check_size(step.size, dims, where)
            ops.append(_crop_or_pad_op(step))
        elif isinstance(step, ResizeStep):
            _check_size(step.size, dims, where)
            ops.append(_resize_op(step, dims))
        else:  # pragma: no cover - the config admits no other step
            raise DataError(f"{where}: unknown preprocessing step")
    names = [s.name for s in steps]

    def preprocess(record: Record) -> Record:
        name = record.name
        image_np = np.asarray(record.image)
        if image_np.ndim != dims + 1:
            raise DataError(
                f"{name}: expected a {dims}D image of shape (C, {', '.join('*' * dims)}), got shape {image_np.shape}"
            )
        image = torch.as_tensor(image_np.astype(np.float32, copy=False))
        mask = None
        if segmentation:
            target = np.asarray(record.target)
            if target.shape != image_np.shape[1:]:
                raise DataError(f"{name}: mask shape {target.shape} does not match image shape {image_np.shape[1:]}")
            mask = torch.as_tensor(target.astype(np.float32))[None]
        spacing = None if record.spacing is None else tuple(float(s) for s in record.spacing)
        for i, op in enumerate(ops):
            try:
                image, mask, spacing = op(image, mask, spacing, name)
            except DataError:
                raise
            except Exception as e:  # a MONAI failure on this record
                raise DataError(f"{name}: preprocessing step {i} ({names[i]}) failed: {e}") from e
        out_image = np.ascontiguousarray(convert_to_numpy(image), dtype=np.float32)
        if mask is None:
            return dataclasses.replace(record, image=out_image, spacing=spacing)
        out_mask = np.ascontiguousarray(np.rint(convert_to_numpy(mask)[0]), dtype=np.int64)
        return dataclasses.replace(record, image=out_image, target=out_mask, spacing=spacing)

    return preprocess


# --------------------------------------------------------------------------- augmentation


class Augmenter:
    """Random augmentation (and patch cropping) of training batches; see :func:`build_augment`.

    ``augmenter(images, labels, seed)``: ``images`` float (B, C, *spatial); ``labels`` int64
    masks (B, *spatial) for segmentation, else classification labels returned unchanged.
    Every example is transformed independently; image and mask together. The same seed
    gives the same output; the global torch, numpy and Python random states are left as
    they were. Returns float32 images and int64 masks, plain tensors on the input's device.
    """

    def __init__(self, steps: Sequence[AugmentStep], patch: Sequence[int] | None, dims: int, segmentation: bool):
        if dims not in (2, 3):
            raise DataError(f"augmentation: data must be 2D or 3D, got {dims}D")
        for i, step in enumerate(steps):
            if isinstance(step, FlipStep):
                bad = [a for a in step.axes if not 0 <= a < dims]
                if bad:
                    raise DataError(
                        f"transforms.augment[{i}] (flip): axes count spatial axes from 0, so {dims}D data "
                        f"has axes 0..{dims - 1}; got {list(step.axes)}"
                    )
        if patch is not None:
            _check_size(patch, dims, "transforms.patch")
        self.steps: tuple[AugmentStep, ...] = tuple(s for s in steps if s.prob > 0)
        self.patch: tuple[int, ...] | None = None if patch is None else tuple(int(p) for p in patch)
        self.dims = dims
        self.segmentation = segmentation
        self.keys: tuple[str, ...] = ("image", "label") if segmentation else ("image",)

    @property
    def is_identity(self) -> bool:
        """True when there is nothing to do (no step with a chance to apply, no patch)."""
        return not self.steps and self.patch is None

    def __repr__(self) -> str:
        names = [s.name for s in self.steps]
        return f"Augmenter(steps={names}, patch={self.patch}, dims={self.dims}, segmentation={self.segmentation})"

    # -- building

    def _spatial_modes(self, image_mode: str, mask_mode: str) -> tuple[str, ...] | str:
        return (image_mode, mask_mode) if self.segmentation else image_mode

    def _step(self, step: AugmentStep, spatial: tuple[int, ...]) -> list[Any]:
        keys, dims = list(self.keys), self.dims
        if isinstance(step, FlipStep):
            return [RandFlipd(keys=keys, prob=step.prob, spatial_axis=a) for a in dict.fromkeys(step.axes)]
        if isinstance(step, Rotate90Step):
            plane = (dims - 2, dims - 1)
            if self.patch is None and spatial[plane[0]] != spatial[plane[1]]:
                # A quarter turn would change the shape of a non-square image and the
                # batch could not be stacked: turn by 180 degrees only (= flip both axes).
                return [RandFlipd(keys=keys, prob=step.prob, spatial_axis=plane)]
            return [RandRotate90d(keys=keys, prob=step.prob, max_k=3, spatial_axes=plane)]
        if isinstance(step, RotateStep):
            rad = math.radians(step.degrees)
            extra = {"range_y": rad, "range_z": rad} if dims == 3 else {}
            return [
                RandRotated(
                    keys=keys, range_x=rad, **extra, prob=step.prob, keep_size=True,
                    mode=self._spatial_modes("bilinear", "nearest"), padding_mode="border", align_corners=False,
                )
            ]
        if isinstance(step, ZoomStep):
            return [
                RandZoomd(
                    keys=keys, prob=step.prob, min_zoom=min(step.min, step.max), max_zoom=max(step.min, step.max),
                    mode=self._spatial_modes(_linear(dims), "nearest-exact"), padding_mode="edge", keep_size=True,
                )
            ]
        if isinstance(step, IntensityStep):
            parts: list[Any] = []
            if step.scale > 0:
                parts.append(RandScaleIntensityd(keys="image", factors=step.scale, prob=1.0))
            if step.shift > 0:
                parts.append(RandShiftIntensityd(keys="image", offsets=step.shift, prob=1.0))
            if not parts or step.prob >= 1:
                return parts
            # scale and shift together, with one draw of ``prob``
            return [OneOf([Compose(parts), Identityd(keys="image")], weights=[step.prob, 1.0 - step.prob])]
        if isinstance(step, NoiseStep):
            return [RandGaussianNoised(keys="image", prob=step.prob, mean=0.0, std=step.std, sample_std=True)]
        if isinstance(step, ContrastStep):
            gamma = (min(step.min, step.max), max(step.min, step.max))
            return [RandAdjustContrastd(keys="image", prob=step.prob, gamma=gamma)]
        raise DataError(f"augmentation: unknown step {step!r}")  # pragma: no cover

    def compose(self, spatial: tuple[int, ...]) -> Compose:
        """A fresh, unseeded MONAI Compose for examples of spatial shape ``spatial``."""
        transforms: list[Any] = []
        for step in self.steps:
            transforms.extend(self._step(step, spatial))
        if self.patch is not None:
            keys = list(self.keys)
            transforms.append(SpatialPadd(keys=keys, spatial_size=list(self.patch), method="symmetric", mode="constant"))
            transforms.append(RandSpatialCropd(keys=keys, roi_size=list(self.patch), random_size=False))
        return Compose(transforms)

    # -- applying

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != self.dims + 2:
            raise DataError(f"augmentation: expected images (B, C, {self.dims} spatial axes), got {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"augmentation: {images.shape[0]} images but {labels.shape[0]} labels")
        if self.segmentation and tuple(labels.shape[1:]) != tuple(images.shape[2:]):
            raise DataError(
                f"augmentation: masks of shape {tuple(labels.shape[1:])} for images of spatial shape "
                f"{tuple(images.shape[2:])}"
            )
        if self.is_identity:
            return images.to(torch.float32), (labels.to(torch.int64) if self.segmentation else labels)
        # None of the MONAI transforms used here draws from torch's global generator (they
        # use their own numpy RandomState), but keep it untouched whatever MONAI does.
        state = torch.random.get_rng_state()
        try:
            tf = self.compose(tuple(int(s) for s in images.shape[2:]))
            tf.set_random_state(seed=int(seed))
            out_images, out_masks = [], []
            for b in range(images.shape[0]):
                item = {"image": images[b].to(torch.float32)}
                if self.segmentation:
                    item["label"] = labels[b][None].to(torch.float32)
                item = tf(item)
                out_images.append(_plain(item["image"]))
                if self.segmentation:
                    out_masks.append(_plain(item["label"])[0])
        finally:
            torch.random.set_rng_state(state)
        x = torch.stack(out_images).to(torch.float32)
        if not self.segmentation:
            return x, labels
        return x, torch.stack(out_masks).round().to(torch.int64)


def build_augment(
    steps: Sequence[AugmentStep], patch: Sequence[int] | None, dims: int, segmentation: bool
) -> Augmenter:
    """The job's augmentation: MONAI dictionary transforms, one per step in order, then
    (with ``patch``) a zero pad to at least the patch size and a random crop of it.

    ``flip``: one random flip per axis in ``axes`` (spatial axes from 0). ``rotate90``: k
    quarter turns (k in 1..3) in the plane of the last two spatial axes; for a non-square
    plane without ``patch`` only half turns, so the batch keeps its shape. ``rotate``: an
    angle in [-degrees, degrees], in-plane for 2D and about each of the 3 axes for 3D,
    border padding. ``zoom``: one isotropic factor, size kept. ``intensity``: scale by
    1 + u then shift, both drawn under one ``prob``. ``noise``: Gaussian noise with std
    drawn in [0, std]. ``contrast``: gamma in [min, max]. Image linear, mask nearest.
    Steps with ``prob`` 0 are dropped. Raises DataError for flip axes or a patch that do
    not fit ``dims``.
    """
    return Augmenter(steps, patch, dims, segmentation)
