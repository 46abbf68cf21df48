"""HarmoFL (Jiang, Wang and Dou, AAAI 2022, "HarmoFL: Harmonizing Local and Global Drifts
in Federated Learning on Heterogeneous Medical Images"), ``algorithm: {name: harmofl}``.

Two parts, both at the site, as the paper places them:

* **Amplitude normalization** (the local drift): every image a site trains and evaluates
  on is taken to the frequency domain, the amplitude of its spectrum (in the central band
  of ``ratio``; 1 is the whole spectrum) is replaced by the site's own average amplitude
  and the image is rebuilt with its own phase (its structure), so that the site's images
  look as if one scanner had taken them (data/frequency.py). The average is computed once,
  at the site, over ``amplitude_images`` of its training images (a site with none, such as
  a held-out site without a training split, uses its evaluation images) and never leaves
  the site: nothing of it is in the
  update. (The authors' published code keeps it as a running average inside the network
  and, in the first round, averages it across the clients through the server; medfed does
  not, so that no spectrum leaves a site.) It applies to the federated model's training
  and evaluation (and fine-tuning); the ``local`` and ``centralized`` baselines see the
  images as read.
* **Weight perturbation** (the global drift): each local step first takes the gradient
  ``g`` of the batch's loss at the weights ``w``, moves to ``w + alpha * g / ||g||`` (the
  norm over all trained parameters), takes the gradient there and steps from ``w`` with
  it (a sharpness-aware step, so that each site's optimum is flat and their average stays
  in a low-loss region). The issue that asked for HarmoFL put this step at the server; the
  paper puts it at the client ("client weight perturbation", with no extra communication),
  because the perturbation needs the site's gradient on its own data, which the server
  never has: so it is the site hook here (``perturb`` / ``unperturb``, called by
  site/train.py). Batch-norm statistics see both forward passes of a step.

The server rule is FedAvg's example-weighted mean (the paper aggregates as FedAvg), so a
robust rule, site-level DP or secure aggregation can take its place. The job refuses 3D
volumes, patch training, other topologies, FedDG's shared spectra and DP-SGD (the
perturbed gradient is not a per-example gradient it can clip); see
config/generalization.harmofl_problem.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, Combiner, SiteHook
from medfed.core.types import Params, Update
from medfed.data.base import SiteData
from medfed.data.frequency import AmplitudeNormalized, site_amplitude

_EPS = 1e-12  # keeps the step finite for a vanishing gradient


class HarmoFLHook(SiteHook):
    """The site half: the weight perturbation of radius ``alpha`` (no state across rounds)."""

    perturbs = True

    def __init__(self, alpha: float):
        self.alpha = alpha

    def perturb(self, model: nn.Module) -> Params | None:
        """Move the trained parameters by ``alpha * g / ||g||`` in place (``g``: their
        current gradients) and return the moves by name; None (nothing moved) when no
        parameter has a gradient or the gradient is not finite (a skipped mixed-precision
        step)."""
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        if not grads:
            return None
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
        if not bool(torch.isfinite(norm)):
            return None
        scale = self.alpha / (float(norm) + _EPS)
        params = dict(model.named_parameters())
        moves: Params = {}
        with torch.no_grad():
            for n, g in grads.items():
                moves[n] = (g * scale).to(params[n].dtype)
                params[n].add_(moves[n])
        return moves

    def unperturb(self, model: nn.Module, moves: Params) -> None:
        """Undo :meth:`perturb` (the gradients taken at the moved weights stay)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, d in moves.items():
                params[n].sub_(d)


class HarmoFL(Algorithm):
    """The server half: FedAvg's weighted mean (or the job's combiner)."""

    name = "harmofl"

    def __init__(self, alpha: float, trainable: frozenset[str] = frozenset(), combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.alpha = alpha

    def make_site_hook(self) -> SiteHook:
        return HarmoFLHook(self.alpha)

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        shared = self.combiner.combine(global_params, updates, updates[0].round)
        return {k: shared.get(k, v) for k, v in global_params.items()}


def harmonized(data: SiteData, ratio: float, count: int, seed: int) -> SiteData:
    """``data`` with every split's images amplitude-normalized toward the site's average
    amplitude (:func:`~medfed.data.frequency.site_amplitude` over ``count`` images drawn
    with ``seed``: of the training split, or of the first non-empty evaluation split at a
    site that has no training images)."""
    source = next((s for s in (data.train, data.val, data.test) if len(s)), data.train)
    reference = site_amplitude(source, count, seed)
    return SiteData(data.name, *(AmplitudeNormalized(s, reference, ratio) for s in (data.train, data.val, data.test)),
                    skipped=data.skipped)
