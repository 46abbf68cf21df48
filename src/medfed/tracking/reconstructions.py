"""Reconstructions kept for inspection (reconstruction task).

For the first ``task.save_predictions`` test slices of each site, the final federated
model's reconstruction is drawn to ``reconstructions/<site>/test_<i>.png``: four grey
panels side by side, the zero-filled input, the reconstruction, the ground truth (each
clipped to [0, 1]) and the error map |reconstruction - ground truth|, white at
:data:`ERROR_WHITE` or more. The report shows them (:func:`reconstructions_section`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.data.base import Planned, SiteData
from medfed.data.kspace_input import zero_filled_image
from medfed.tracking.tables import pictures_section

RECONSTRUCTIONS_DIR = "reconstructions"
ERROR_WHITE = 0.25  # an absolute error this large (images in [0, 1]) is drawn white
MIN_PANEL = 128  # small images are enlarged (nearest neighbour) to at least this height
MAX_REPORT_IMAGES = 4  # per site in the report; all of them stay in the folder


def panels(zero_filled: np.ndarray, recon: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(H, k*W*4 + gaps) uint8: zero-filled, reconstruction, ground truth and error map
    (each (H, W)) side by side, 2 px of white between them."""
    k = max(1, MIN_PANEL // max(1, truth.shape[0]))
    views = [np.clip(zero_filled, 0, 1), np.clip(recon, 0, 1), np.clip(truth, 0, 1),
             np.clip(np.abs(recon - truth) / ERROR_WHITE, 0, 1)]
    views = [(v * 255).astype(np.uint8).repeat(k, axis=0).repeat(k, axis=1) for v in views]
    gap = np.full((views[0].shape[0], 2), 255, dtype=np.uint8)
    out = [views[0]]
    for v in views[1:]:
        out += [gap, v]
    return np.concatenate(out, axis=1)


@torch.no_grad()
def save_reconstructions(
    model: nn.Module, sites: list[SiteData], out_dir: Path, count: int, device: torch.device
) -> list[Path]:
    """Draw the reconstructions of ``model`` for the first ``count`` test slices of every
    site to ``out_dir/<site>/``; return the PNG files written."""
    from PIL import Image

    written: list[Path] = []
    model.eval()
    for site in sites:
        test = site.test
        folder = out_dir / site.name
        folder.mkdir(parents=True, exist_ok=True)
        plan = [Planned(torch.arange(0, min(count, len(test))))]
        for batch in test.batches(plan):
            recon = model(batch.images.to(device)).float().cpu().numpy()
            zero_filled = zero_filled_image(batch.images)  # a k-space network's packed input: its image
            for i in range(len(batch)):
                path = folder / f"test_{i:03d}.png"
                Image.fromarray(panels(zero_filled[i, 0].numpy(), recon[i, 0], batch.labels[i, 0].numpy())).save(path)
                written.append(path)
    return written


def reconstructions_section(run_dir: Path) -> str:
    """The report's pictures of :func:`save_reconstructions`; empty when the run has none."""
    return pictures_section(
        run_dir / RECONSTRUCTIONS_DIR, "Reconstructions (test, final federated model)",
        "Each picture: zero-filled input, reconstruction, ground truth, error map (|reconstruction − ground "
        f"truth|, white at {ERROR_WHITE:g} or more). All of them are in the run folder under "
        f"{RECONSTRUCTIONS_DIR}/.", MAX_REPORT_IMAGES, 400)
