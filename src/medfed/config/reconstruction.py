"""MRI reconstruction's settings: the task (``task: {kind: reconstruction, ...}``), its
sources (generated phantoms, ``data: {source: synthetic_phantoms, ...}``; fastMRI HDF5
files, ``data: {source: fastmri, ...}``; the images of ``pairs``, ``medmnist`` and ``folder``,
and the 2D slices of ``volumes``, data/slices.py) and the
checks across the job's sections that a reconstruction job must pass
(:func:`reconstruction_problem`). The data pipeline is data/kspace.py and
data/phantoms.py; the loss and metrics tasks/reconstruction.py.
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medfed.config.limits import MAX_EXAMPLES, MAX_SITES, SiteName, unique_names
from medfed.core.schema import Count, Frozen, Real

# the sources a reconstruction task reads: its own, 2D images whose other targets it drops, and volumes' 2D slices
RECONSTRUCTION_SOURCES = ("synthetic_phantoms", "fastmri", "pairs", "medmnist", "folder", "volumes")
RECONSTRUCTION_ONLY = ("synthetic_phantoms", "fastmri")  # sources for no other task
RECONSTRUCTORS = ("unet", "segresnet", "varnet")  # networks by name that reconstruct (one channel out)
KSPACE_MODELS = ("varnet",)  # networks by name that read the masked k-space and its mask (data/kspace_input.py)


def reads_kspace(model: Any) -> bool:
    """True when the job's ``model`` section is a network by name that reads the
    undersampled k-space and its mask in place of the zero-filled image (``varnet``)."""
    return getattr(model, "name", None) in KSPACE_MODELS


class ReconstructionTaskConfig(Frozen):
    """MRI reconstruction, single-coil Cartesian: each 2D magnitude image is taken to
    k-space by FFT, undersampled along its last axis (phase encoding) by a MONAI k-space
    mask, and brought back by inverse FFT: the *zero-filled* image is the network's input,
    the full image its target. ``acceleration``: the undersampling factor (1 keeps every
    line; a site's own ``acceleration`` in the data section replaces it there);
    ``center_fraction``: the share of low-frequency lines always kept; ``mask``:
    ``equispaced`` (lines at equal spacing, random offset) or ``random`` (lines drawn
    uniformly), MONAI's ``EquispacedKspaceMask`` / ``RandomKspaceMask``. Each example's mask
    is drawn once, from the job seed and the example's site, split and index, so the
    zero-filled input is the same in every arm and round.

    ``loss``: ``l1`` (mean absolute error) or ``l1_ssim`` (L1 + (1 - SSIM), MONAI's
    ``SSIMLoss``). Metrics per site: ``psnr`` (dB, peak 1), ``ssim``, ``nmse``; ``monitor``
    picks the best model on val. ``residual``: networks medfed builds predict the correction
    to their input (output = input + network(input)), so that training starts from the
    zero-filled image (not ``varnet``, whose cascades refine the measured k-space already;
    it reads the masked k-space and the mask, data/kspace_input.py). ``save_predictions``: test slices per site drawn in the report
    (zero-filled, reconstruction, ground truth, error map).

    ``slice_axis`` (``source: volumes`` only): the array axis (0, 1 or 2) along which each
    volume, read and preprocessed in 3D, is cut into 2D slices (data/slices.py); default the
    last one for NIfTI (axial for RAS or LPS files) and the first for DICOM (the series'
    own slices). Left out of the job's dump (and hash) when unset."""

    kind: Literal["reconstruction"]
    acceleration: Real = Field(4.0, ge=1, le=64)
    center_fraction: Real = Field(0.08, gt=0, lt=1)
    mask: Literal["equispaced", "random"] = "equispaced"
    loss: Literal["l1", "l1_ssim"] = "l1"
    monitor: Literal["ssim", "psnr"] = "ssim"
    residual: bool = True
    save_predictions: Count = Field(4, ge=0, le=1000)
    slice_axis: Count | None = Field(None, ge=0, le=2, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _center_below_rate(self) -> "ReconstructionTaskConfig":
        if self.acceleration * self.center_fraction >= 1:
            raise ValueError(
                f"center_fraction: {self.center_fraction:g} of the lines kept at the centre already samples "
                f"1/{self.acceleration:g} (acceleration {self.acceleration:g}) or more; lower center_fraction below "
                f"{1 / self.acceleration:g} or the acceleration"
            )
        return self


class PhantomSite(Frozen):
    """One site of generated MRI-like phantoms: its split sizes and, for a reconstruction
    task, its own ``acceleration`` (sites scanning at different speeds), else the task's."""

    name: SiteName
    n_train: Count = Field(gt=0, le=MAX_EXAMPLES)
    n_val: Count = Field(20, gt=0, le=MAX_EXAMPLES)
    n_test: Count = Field(gt=0, le=MAX_EXAMPLES)
    acceleration: Real | None = Field(None, ge=1, le=64)


class PhantomData(Frozen):
    """Generated 2D MRI-like phantoms (data/phantoms.py), 1 channel in [0, 1], for
    reconstruction: a head-like ellipse with ``ellipses`` smaller ellipses of random
    position, size, angle and intensity inside it. ``image_size`` must be even (the
    k-space mask keeps a centred band of lines)."""

    source: Literal["synthetic_phantoms"]
    sites: list[PhantomSite] = Field(min_length=1, max_length=MAX_SITES)
    image_size: Count = Field(64, ge=16, le=512)
    ellipses: Count = Field(8, ge=1, le=50)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[PhantomSite]) -> list[PhantomSite]:
        unique_names([s.name for s in v], "site names")
        return v

    @field_validator("image_size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"must be even for k-space undersampling (a centred band of lines), got {v}")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class FastMRISite(Frozen):
    """One site's fastMRI files: folders of single-coil ``.h5`` files for each split (a
    patient's slices stay in one split), and its own ``acceleration``, else the task's."""

    name: SiteName
    train: Path
    val: Path
    test: Path
    acceleration: Real | None = Field(None, ge=1, le=64)


class FastMRIData(Frozen):
    """fastMRI single-coil HDF5 files (read with MONAI's ``FastMRIReader``, which needs the
    ``h5py`` package: ``pip install -e ".[fastmri]"``): each file's ``kspace`` (slices, H, W),
    complex, is undersampled by the task's mask and brought back by inverse FFT, centre-cropped
    to the ground truth ``target`` (``reconstruction_esc``, or ``reconstruction_rss``), and
    both are divided by the slice's ground-truth maximum (so it lies in [0, 1])."""

    source: Literal["fastmri"]
    sites: list[FastMRISite] = Field(min_length=1, max_length=MAX_SITES)
    target: Literal["reconstruction_esc", "reconstruction_rss"] = "reconstruction_esc"

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[FastMRISite]) -> list[FastMRISite]:
        unique_names([s.name for s in v], "site names")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


def reconstruction_problem(job: Any) -> str | None:
    """Why ``job`` cannot run as a reconstruction job, naming the field; None when it can.
    A reconstruction task reads a source it can undersample, with an image-to-image network,
    and nothing that would change its input apart from its target; a phantom source needs a
    reconstruction task. ``job``: a :class:`~medfed.config.job.Job` being validated (not
    imported here: the job module imports this one)."""
    task, data = job.task, job.data
    if task.kind != "reconstruction":
        return f"data.source: '{data.source}' data is for task.kind: reconstruction, got task.kind '{task.kind}'"
    if data.source not in RECONSTRUCTION_SOURCES:
        return f"data.source: a reconstruction task reads {list(RECONSTRUCTION_SOURCES)} for now, got '{data.source}'"
    name = getattr(job.model, "name", None)  # a network by name; the other forms take the sizes the data gives
    if name is not None and name not in RECONSTRUCTORS:
        return (f"model.name: '{name}' classifies; a reconstruction task maps an image to an image: use "
                f"one of {list(RECONSTRUCTORS)}, or a MONAI class such as BasicUNet")
    t = job.transforms
    own = data.source in RECONSTRUCTION_ONLY  # images made or read as k-space: nothing to preprocess
    if getattr(data, "dims", 2) != 2:
        return f"data.dims: reconstruction undersamples 2D images, got {data.dims}"
    if getattr(data, "channels", 1) != 1:
        return f"data.channels: reconstruction undersamples grey images, got {data.channels}; set data.channels: 1"
    if own and t.preprocess:
        return (f"transforms.preprocess: '{data.source}' images are made or read as k-space and not preprocessed; "
                "leave it out (it applies to the images of the file sources and medmnist)")
    volumes = data.source == "volumes"
    if task.slice_axis is not None and not volumes:
        return (f"task.slice_axis: cuts volumes into 2D slices (data.source: volumes), but '{data.source}' reads "
                "2D images; leave it out")
    read_dims = 3 if volumes else 2  # volumes are preprocessed in 3D, then cut into slices
    for i, step in enumerate(t.preprocess):
        size = getattr(step, "size", None) or getattr(step, "pixdim", None)
        if size is not None and len(size) != read_dims:
            what = "volumes are preprocessed in 3D before they are cut into slices" if volumes else "2D images"
            return f"transforms.preprocess[{i}]: {step.name} needs {read_dims} sizes ({what}), got {list(size)}"
    for used, field in ((t.augment, "transforms.augment"),
                        (t.patch is not None, "transforms.patch"), (job.feature_shift, "feature_shift"),
                        (job.train.engine == "bundle", "train.engine")):
        if used:
            return (f"{field}: not supported with task.kind: reconstruction yet (it would change the zero-filled "
                    "input apart from its ground truth); leave it out")
    for i, site in enumerate((getattr(data, "sites", None) or [])):
        a = getattr(site, "acceleration", None)
        if a is not None and a * task.center_fraction >= 1:
            return (f"data.sites[{i}].acceleration: {a:g} with task.center_fraction {task.center_fraction:g}: the "
                    f"lines kept at the centre already sample 1/{a:g} or more; lower center_fraction below {1 / a:g} "
                    "or the acceleration")
    return None
