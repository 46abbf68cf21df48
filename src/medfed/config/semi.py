"""The job's ``semi_supervised`` section: training on a site's unlabeled examples too
(site/semi.py), and the checks of a job that has unlabeled examples.

``method: mean_teacher`` (Tarvainen and Valpola, 2017): a teacher, the exponential moving
average of the student (``ema`` decay per step), sees each training image under the
``weak`` augmentation; the student's predictions on the image as it trains are pulled
towards the teacher's (mean squared difference of the probabilities), on labeled and
unlabeled images. ``method: fixmatch`` (Sohn et al., 2020): the model's prediction on the
``weak`` view of an unlabeled image is its pseudo-label where the model is at least
``threshold`` confident; the cross-entropy of the model on the ``strong`` view against
it. ``weight`` multiplies the term; ``rampup_rounds`` grows it linearly over the first
federated rounds a site trains (0: full weight from the start). Segmentation is pixel-wise,
so its views may only change intensities (no flip, rotation or zoom).
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Any, Literal

from pydantic import Field, model_validator

from medfed.config.limits import MAX_ROUNDS
from medfed.config.transforms import AugmentStep, ContrastStep, FlipStep, IntensityStep, NoiseStep
from medfed.core.schema import Count, Frozen, Real

DEFAULT_THRESHOLD = 0.95
DEFAULT_EMA = 0.99
# steps that move pixels: a pixel-wise consistency or pseudo-label would compare different pixels
SPATIAL_STEPS = ("flip", "rotate90", "rotate", "zoom")


class SemiConfig(Frozen):
    """See the module docstring. ``weak`` and ``strong`` (default: :func:`default_views`)
    are augmentation steps as in ``transforms.augment``."""

    method: Literal["mean_teacher", "fixmatch"]
    weight: Real = Field(1.0, gt=0, le=100)
    threshold: Real | None = Field(None, gt=0, lt=1)
    ema: Real | None = Field(None, ge=0, lt=1)
    rampup_rounds: Count = Field(0, ge=0, le=MAX_ROUNDS)
    weak: list[AugmentStep] | None = None
    strong: list[AugmentStep] | None = None

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> "SemiConfig":
        if self.method == "mean_teacher":
            for field, why in (("threshold", "FixMatch's confidence for a pseudo-label"),
                               ("strong", "FixMatch's strong view; the mean teacher compares weak views")):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field}: is {why}; leave it out with method: mean_teacher")
        elif self.ema is not None:
            raise ValueError("ema: is the mean teacher's averaging decay; leave it out with method: fixmatch")
        return self

    @property
    def decay(self) -> float:
        return DEFAULT_EMA if self.ema is None else self.ema

    @property
    def confidence(self) -> float:
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    def views(self, segmentation: bool) -> tuple[list[Any], list[Any]]:
        """The weak and strong augmentation steps: as given, else :func:`default_views`."""
        weak, strong = default_views(segmentation)
        return (list(self.weak) if self.weak is not None else weak,
                list(self.strong) if self.strong is not None else strong)


def default_views(segmentation: bool) -> tuple[list[Any], list[Any]]:
    """Weak: a random flip on both axes (classification only) and a small intensity jitter;
    strong: the weak view and a stronger intensity jitter, gamma contrast and noise."""
    weak: list[Any] = [IntensityStep(name="intensity", scale=0.05, shift=0.05, prob=1.0)]
    if not segmentation:
        weak = [FlipStep(name="flip", axes=[0, 1], prob=0.5), *weak]
    strong = weak + [
        IntensityStep(name="intensity", scale=0.3, shift=0.2, prob=1.0),
        ContrastStep(name="contrast", min=0.5, max=2.0, prob=1.0),
        NoiseStep(name="noise", std=0.1, prob=1.0),
    ]
    return weak, strong


def semi_problem(job: Any) -> str | None:
    """Why ``job``'s unlabeled examples or ``semi_supervised`` section cannot run, naming the
    field; None when they can (or the job has neither)."""
    semi: SemiConfig | None = job.semi_supervised
    sites = getattr(job.data, "sites", None) or []
    unlabeled = [i for i, s in enumerate(sites) if getattr(s, "unlabeled", False)]
    if job.task.kind == "reconstruction":  # its targets are the images: there is no label to hide
        if getattr(job.data, "labeled_fraction", None) is not None:
            return "data.labeled_fraction: a reconstruction's targets are its images, not labels; leave it out"
        for i, s in enumerate(sites):
            if getattr(s, "labeled_fraction", None) is not None or getattr(s, "unlabeled", False):
                return f"data.sites[{i}]: labeled_fraction and unlabeled are for labels; a reconstruction has none"
    if semi is None:
        if unlabeled:
            i = unlabeled[0]
            return (f"data.sites[{i}].unlabeled: site '{sites[i].name}' has no labels and would take part only "
                    "through semi_supervised; add a semi_supervised section or leave the site out")
        return None
    if job.task.kind not in ("classification", "segmentation"):
        return (f"semi_supervised: is for classification and 2D segmentation, not task.kind "
                f"'{job.task.kind}'; leave it out")
    if job.task.kind == "segmentation" and job.data_dims != 2:
        return ("semi_supervised: segmentation is supported in 2D only (pixel-wise consistency and pseudo-labels); "
                f"the data are {job.data_dims or 'of unknown'}D; leave it out")
    if job.train.engine != "medfed":
        return "train.engine: the bundle's trainer has no semi-supervised step; use train.engine: medfed"
    # topology.kind: split (its own batch exchange) refuses the section in config/topology.py
    if job.algorithm.name == "harmofl":
        return ("algorithm.name: harmofl's sharpness-aware second pass retakes the task loss of the whole batch, "
                "without the semi-supervised term and with the unlabeled examples' placeholder labels; use another "
                "algorithm with semi_supervised")
    if job.privacy.dp_sgd is not None:
        return ("privacy.dp_sgd: the semi-supervised term is not clipped per example by DP-SGD; leave one of "
                "privacy.dp_sgd and semi_supervised out")
    if job.task.kind == "segmentation":
        weak, strong = semi.views(True)
        for field, steps in (("weak", weak), ("strong", strong)):
            for i, step in enumerate(steps):
                if step.name in SPATIAL_STEPS:
                    return (f"semi_supervised.{field}[{i}]: {step.name} moves pixels, but segmentation compares "
                            "views pixel by pixel; use intensity, noise or contrast steps")
    training = [i for i, s in enumerate(sites) if s.name not in job.held_out]
    if sites and training and all(i in unlabeled for i in training):
        return ("semi_supervised: no training site has a single label (every site of data.sites has unlabeled: "
                "true); give at least one site labels")
    return None
