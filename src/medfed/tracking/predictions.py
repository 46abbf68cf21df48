"""Predicted masks kept for inspection (segmentation).

For the first ``task.save_predictions`` test examples of each site, the final federated
model's prediction is written to ``predictions/<site>/``:

* 2D: ``<name>.png``, three panels side by side: the image, the ground truth and the
  prediction, classes drawn in colour over the image (shown in the report);
* 3D: ``<name>_pred.nii.gz``, the predicted label volume with the data's spacing, and
  ``<name>.png``, the same three panels for the middle slice along the first axis.

In a simulation the files are written where the run folder is. The model is the
federated model as the server holds it: for FedBN, whose batch-norm layers stay at the
sites, the server's copy of those layers is used.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.data.base import Planned, SiteData

# class colours (RGB) for classes 1, 2, ...; class 0 (background) is left uncoloured
PALETTE = np.array(
    [[230, 75, 53], [77, 187, 213], [0, 160, 135], [243, 155, 127], [145, 209, 194], [220, 0, 0], [126, 97, 72]],
    dtype=np.float32,
)
PREDICTIONS_DIR = "predictions"


def _safe(name: str) -> str:
    """A file name made from an example's name: its stem, unusual characters replaced."""
    stem = Path(name).name
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:100] or "example"


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the image (first channel, or RGB) scaled to its own range, with
    each foreground class of ``mask`` (H, W) blended in its colour."""
    img = image.astype(np.float32)
    rgb = np.repeat(img[0][..., None], 3, axis=2) if img.shape[0] != 3 else np.moveaxis(img, 0, -1)
    lo, hi = float(rgb.min()), float(rgb.max())
    rgb = (rgb - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(rgb)
    for k in range(1, int(mask.max()) + 1 if mask.size else 1):
        sel = mask == k
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * PALETTE[(k - 1) % len(PALETTE)]
    return rgb.clip(0, 255).astype(np.uint8)


MIN_PANEL = 128  # small images are enlarged (nearest neighbour) to at least this height


def panels(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Image, ground truth and prediction side by side, 2 px of white between them;
    images smaller than MIN_PANEL pixels high are enlarged by a whole factor."""
    k = max(1, MIN_PANEL // max(1, truth.shape[0]))
    views = [overlay(image, np.zeros_like(truth)), overlay(image, truth), overlay(image, pred)]
    views = [v.repeat(k, axis=0).repeat(k, axis=1) for v in views]
    gap = np.full((views[0].shape[0], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([views[0], gap, views[1], gap, views[2]], axis=1)


@torch.no_grad()
def save_predictions(
    model: nn.Module, sites: list[SiteData], task, out_dir: Path, count: int, device: torch.device
) -> list[Path]:
    """Write the predictions of ``model`` on the first ``count`` test examples of every
    site to ``out_dir/<site>/``; return the PNG files written (see the module docstring)."""
    from PIL import Image

    written: list[Path] = []
    if count <= 0:
        return written
    model.eval()
    for site in sites:
        test = site.test
        folder = out_dir / site.name
        folder.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        plan = (Planned(torch.tensor([i])) for i in range(min(count, len(test))))
        for i, batch in enumerate(test.batches(plan)):
            if len(batch) == 0:  # its file was skipped as unreadable
                continue
            pred = task.infer(model, batch.images.to(device)).float().argmax(1)[0].cpu().numpy().astype(np.int64)
            image, truth = batch.images[0].numpy(), batch.labels[0].numpy()
            name = _safe(test.names[i]) if test.names is not None else f"test_{i:03d}"
            while name in used:
                name += "_"
            used.add(name)
            if pred.ndim == 3:  # a volume: the label volume, and the middle slice as a picture
                import nibabel as nib

                spacing = batch.spacings[0] or test.spacing or (1.0,) * 3
                nib.save(nib.Nifti1Image(pred.astype(np.int16), np.diag([*spacing, 1.0])), str(folder / f"{name}_pred.nii.gz"))
                mid = pred.shape[0] // 2
                image, truth, pred = image[:, mid], truth[mid], pred[mid]
            path = folder / f"{name}.png"
            Image.fromarray(panels(image, truth, pred)).save(path)
            written.append(path)
    return written
