"""Semi-supervised local training: a site's unlabeled examples train the model too.

The job's ``semi_supervised`` section (config/semi.py) gives each site a second hook,
:class:`MeanTeacher` or :class:`FixMatch`, that adds a term of the batch to the loss
(``SiteHook.batch_loss``) in the one training step (site/train.py), whichever algorithm
runs: :class:`Composed` joins it to the algorithm's hook, whose phases, extras, probe,
personal model and gradient corrections stay the algorithm's. The baselines (local,
centralized, fine-tuned) train with the semi-supervised hook alone.

Both methods see each batch as the step trains on it (the job's augmentation applied),
labeled and unlabeled examples mixed; the task loss covers the labeled ones. Predictions
are per class along axis 1: a classifier's (B, K) logits (binary: one logit, read as the
two classes), a segmenter's (B, K, H, W), pixel by pixel.

* Mean teacher (Tarvainen and Valpola, 2017): the teacher's weights are the exponential
  moving average of the student's, ``teacher = ema * teacher + (1 - ema) * student`` after
  every optimizer step (batch-norm statistics averaged alike); it starts as the model the
  site first trains from and is kept across rounds as site state (``state_fields``), so a
  resumed run goes on with it. The term: ``weight * ramp * mean((p_student(x) -
  p_teacher(weak(x)))^2)`` over every example, labeled or not; the teacher runs in eval
  mode.
* FixMatch (Sohn et al., 2020): on the unlabeled examples, the model (in eval mode, no
  gradient) predicts the ``weak`` view; where its top probability is at least
  ``threshold`` that class is the pseudo-label, and the term is ``weight * ramp *
  sum(mask * CE(model(strong(x)), pseudo)) / count`` (count: every unlabeled prediction,
  confident or not, as in the paper). No confident prediction: no term (the supervised
  loss only).

``ramp`` grows linearly from 1/``rampup_rounds`` at round 1 to 1 (1 throughout when 0).
The views are the job's augmentation steps built by data/transforms.py (MONAI), each
batch's seeds drawn from the round's training seed, so a run is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from medfed.algorithms.base import Phase, SiteHook
from medfed.config import Job, SemiConfig
from medfed.core.params import average_start, moving_average
from medfed.core.types import Params, RoundPlan, TrainSettings

View = Callable[[torch.Tensor, int], torch.Tensor]  # (images (B, C, *spatial), seed) -> images


def build_view(steps: list, dims: int) -> View:
    """A random view of a batch made of augmentation ``steps`` (config/transforms.py) with
    MONAI, seeded per call; labels are not touched (the steps of segmentation views move no
    pixel: config/semi.py refuses those that would)."""
    from medfed.data.transforms import build_augment

    augment = build_augment(steps, None, dims, segmentation=False)

    def view(images: torch.Tensor, seed: int) -> torch.Tensor:
        placeholder = torch.zeros(len(images), dtype=torch.int64)
        out, _ = augment(images.detach().float().cpu(), placeholder, seed)
        return out.to(images.device, images.dtype)

    return view


def class_log_probs(logits: torch.Tensor, binary_or_multilabel: bool) -> torch.Tensor:
    """Log-probabilities with the classes on axis 1: a softmax over axis 1 (multi-class,
    segmentation), or each logit read as two classes, (not, is), for sigmoid outputs
    (binary (B, 1) -> (B, 2); multi-label (B, K) -> (B, 2, K))."""
    logits = logits.float()
    if binary_or_multilabel:
        out = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
        return out[:, :, 0] if logits.shape[1] == 1 else out
    return F.log_softmax(logits, dim=1)


class SemiHook(SiteHook):
    """What both methods share: the views, the per-batch seeds, the ramp."""

    def __init__(self, cfg: SemiConfig, sigmoid: bool, dims: int, segmentation: bool):
        self.cfg, self.sigmoid = cfg, sigmoid
        weak, strong = cfg.views(segmentation)
        self.weak, self.strong = build_view(weak, dims), build_view(strong, dims)
        self._seeds = torch.Generator()
        self.ramp = 1.0

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        # the views' seeds: from the round's training seed, apart from the loop's own draws
        self._seeds.manual_seed(int(np.random.SeedSequence([plan.train.seed, 0x5E31]).generate_state(1)[0]))
        r = self.cfg.rampup_rounds
        self.ramp = 1.0 if r == 0 else min(1.0, max(plan.round, 1) / r)

    def _seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self._seeds))

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return class_log_probs(logits, self.sigmoid)


class MeanTeacher(SemiHook):
    """See the module docstring. ``teacher``: the moving average, a state dict (None before
    the site's first training)."""

    state_fields = ("teacher",)

    def __init__(self, cfg: SemiConfig, sigmoid: bool, dims: int, segmentation: bool):
        super().__init__(cfg, sigmoid, dims, segmentation)
        self.teacher: Params | None = None

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        super().on_train_start(model, plan)
        self.teacher = average_start(self.teacher, model.state_dict(), next(model.parameters()).device)

    def batch_loss(self, model: nn.Module, images: torch.Tensor, outputs: torch.Tensor,
                   labeled: torch.Tensor) -> torch.Tensor | None:
        assert self.teacher is not None, "on_train_start sets the teacher"
        seen = self.weak(images, self._seed())
        was = model.training
        model.eval()  # the teacher's batch-norm statistics, no dropout
        try:
            with torch.no_grad():
                taught = functional_call(model, self.teacher, (seen,))
        finally:
            model.train(was)
        student = self.log_probs(outputs).exp()
        return self.cfg.weight * self.ramp * F.mse_loss(student, self.log_probs(taught).exp())

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        assert self.teacher is not None
        moving_average(self.teacher, model.state_dict(), self.cfg.decay)


class FixMatch(SemiHook):
    """See the module docstring. Keeps no state across rounds."""

    def batch_loss(self, model: nn.Module, images: torch.Tensor, outputs: torch.Tensor,
                   labeled: torch.Tensor) -> torch.Tensor | None:
        unlabeled = ~labeled
        if not bool(unlabeled.any()):
            return None
        x = images[unlabeled]
        weak, strong = self.weak(x, self._seed()), self.strong(x, self._seed())
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                confidence, pseudo = self.log_probs(model(weak)).exp().max(dim=1)
        finally:
            model.train(was)
        confident = confidence >= self.cfg.confidence
        if not bool(confident.any()):
            return None
        per = F.nll_loss(self.log_probs(model(strong)), pseudo, reduction="none")
        return self.cfg.weight * self.ramp * (per * confident).sum() / confident.numel()


class Composed(SiteHook):
    """The algorithm's hook with a semi-supervised one: the algorithm's phases, probe,
    extras, start loss, gradient changes and personal model; both hooks' per-step terms
    and callbacks; their states side by side (``algorithm/...``, ``semi/...``)."""

    def __init__(self, algorithm: SiteHook, semi: SiteHook):
        self.algorithm, self.semi = algorithm, semi
        self.wants_start_loss = algorithm.wants_start_loss
        self.perturbs = getattr(algorithm, "perturbs", False)

    def on_start_loss(self, loss: float | None) -> None:
        self.algorithm.on_start_loss(loss)

    def probe(self, global_params: Params, plan: RoundPlan) -> Params | None:
        return self.algorithm.probe(global_params, plan)

    def on_probe(self, value: float | None) -> None:
        self.algorithm.on_probe(value)

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        self.algorithm.on_train_start(model, plan)
        self.semi.on_train_start(model, plan)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.algorithm.extra_loss(model)

    def batch_loss(self, model: nn.Module, images: torch.Tensor, outputs: torch.Tensor,
                   labeled: torch.Tensor) -> torch.Tensor | None:
        terms = [t for t in (self.algorithm.batch_loss(model, images, outputs, labeled),
                             self.semi.batch_loss(model, images, outputs, labeled)) if t is not None]
        return None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def on_after_backward(self, model: nn.Module) -> None:
        self.algorithm.on_after_backward(model)

    def perturb(self, model: nn.Module) -> Params | None:
        return self.algorithm.perturb(model)

    def unperturb(self, model: nn.Module, moves: Params) -> None:
        self.algorithm.unperturb(model, moves)

    def on_step_end(self, model: nn.Module) -> None:
        self.algorithm.on_step_end(model)
        self.semi.on_step_end(model)

    def on_train_end(self, model: nn.Module, num_steps: int) -> Params:
        return self.algorithm.on_train_end(model, num_steps)

    def phases(self, settings: TrainSettings, global_params: Params) -> list[Phase]:
        return self.algorithm.phases(settings, global_params)

    def personal_model(self) -> Params | None:
        return self.algorithm.personal_model()

    def state(self) -> Params:
        out = {f"algorithm/{k}": v for k, v in self.algorithm.state().items()}
        return out | {f"semi/{k}": v for k, v in self.semi.state().items()}

    def load_state(self, state: Params) -> None:
        parts: dict[str, Params] = {"algorithm": {}, "semi": {}}
        for key, t in state.items():
            part, _, name = key.partition("/")
            if part not in parts or not name:
                raise ValueError(f"semi-supervised site state: unexpected entry '{key}'")
            parts[part][name] = t
        self.algorithm.load_state(parts["algorithm"])
        self.semi.load_state(parts["semi"])


def make_semi_hook(job: Job) -> SemiHook | None:
    """The job's semi-supervised hook (a fresh one each call: one per site and arm), or
    None without a ``semi_supervised`` section."""
    cfg = job.semi_supervised
    if cfg is None:
        return None
    segmentation = job.task.kind == "segmentation"
    sigmoid = not segmentation and job.task.labels in ("binary", "multilabel")  # type: ignore[union-attr]
    kind = MeanTeacher if cfg.method == "mean_teacher" else FixMatch
    return kind(cfg, sigmoid, job.data_dims or 2, segmentation)


def with_semi(hook: SiteHook, job: Job) -> SiteHook:
    """``hook`` joined with the job's semi-supervised hook (``hook`` itself without one)."""
    semi = make_semi_hook(job)
    return hook if semi is None else Composed(hook, semi)
