"""MRI reconstruction: the network maps the zero-filled magnitude image to the full one.

Inputs and outputs are float (B, 1, H, W); the target (the split's labels) is the ground
truth (B, 1, H, W), scaled to [0, 1] (data/kspace.py, data/phantoms.py). Metrics are per
image, then averaged over the split:

* ``psnr`` = 10 log10(1 / MSE) in dB, peak 1 (MONAI ``PSNRMetric``), capped at
  :data:`PSNR_CAP_DB` so that a perfect reconstruction has a finite value;
* ``ssim``: MONAI ``SSIMMetric`` (Gaussian window 11, sigma 1.5, data range 1): 1 for a
  perfect reconstruction;
* ``nmse`` = ||recon - truth||^2 / ||truth||^2 (by hand: MONAI has none); 0 when perfect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfed.config import ReconstructionTaskConfig
from medfed.core.types import Metric

PSNR_CAP_DB = 100.0
DATA_RANGE = 1.0


class ReconstructionTask:
    """Loss, inference and metrics for image-to-image reconstruction."""

    def __init__(self, cfg: ReconstructionTaskConfig):
        self.cfg = cfg
        self.monitor = cfg.monitor
        self._ssim_loss = None
        if cfg.loss == "l1_ssim":
            from monai.losses import SSIMLoss

            self._ssim_loss = SSIMLoss(spatial_dims=2, data_range=DATA_RANGE)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean absolute error of output (B, 1, H, W) against target (B, 1, H, W), plus
        1 - SSIM with ``loss: l1_ssim``: a scalar, in float32 with autocast off."""
        if output.shape != target.shape:
            raise ValueError(f"reconstruction output {tuple(output.shape)} does not match target {tuple(target.shape)}")
        with torch.autocast(device_type=output.device.type, enabled=False):
            out, tgt = output.float(), target.float()
            loss = torch.nn.functional.l1_loss(out, tgt)
            if self._ssim_loss is not None:
                loss = loss + self._ssim_loss(out, tgt)
            return loss

    def infer(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction (B, 1, H, W) of ``model`` (in eval mode) for zero-filled images."""
        return model(images)

    def evaluator(self, spacing: Sequence[float] | None = None, distances: bool = True) -> "ReconstructionEvaluator":
        """A fresh accumulator of batches (``spacing`` and ``distances`` are for
        segmentation and unused here)."""
        return ReconstructionEvaluator()


def image_metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR, SSIM and NMSE (each (B,)) of output against target (B, 1, H, W)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    out, tgt = output.detach().float().cpu(), target.detach().float().cpu()
    psnr = PSNRMetric(max_val=DATA_RANGE, reduction="none")(out, tgt).reshape(-1)
    ssim = SSIMMetric(spatial_dims=2, data_range=DATA_RANGE, reduction="none")(out, tgt).reshape(-1)
    err = ((out - tgt) ** 2).flatten(1).sum(1)
    norm = (tgt**2).flatten(1).sum(1)
    nmse = torch.where(norm > 0, err / norm.clamp_min(1e-12), torch.where(err > 0, torch.inf, 0.0))
    return {Metric.PSNR: psnr.clamp(max=PSNR_CAP_DB), Metric.SSIM: ssim, Metric.NMSE: nmse}


class ReconstructionEvaluator:
    """Per-image PSNR, SSIM and NMSE, streamed: each batch is reduced to three numbers per
    image on arrival; ``result()`` gives their means over the split (None when empty)."""

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {Metric.PSNR: [], Metric.SSIM: [], Metric.NMSE: []}

    def add(self, output: torch.Tensor, target: torch.Tensor, spacings: Sequence | None = None) -> None:
        """Take one batch: reconstructions and ground truth, both (B, 1, H, W)."""
        if output.shape != target.shape:
            raise ValueError(f"reconstruction output {tuple(output.shape)} does not match target {tuple(target.shape)}")
        for name, values in image_metrics(output, target).items():
            self._values[name].append(values)

    def result(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, parts in self._values.items():
            values = torch.cat(parts) if parts else torch.empty(0)
            out[name] = float(values.double().mean()) if len(values) else None
        return out
