"""A scanner's signature on images: intensity, contrast, blur, resolution and noise.

Used by the synthetic generators (each simulated site has its scanner) and by a job's
``feature_shift``, which puts a site's signature on real images after they are read and
preprocessed, so that heterogeneity between sites can be studied on real data. Works on
2D (N, C, H, W) and 3D (N, C, D, H, W) images alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medfed.config import ScannerConfig
from medfed.data.base import ArraySplit, SiteData


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial axes of (N, C, *spatial) images; ``sigma``
    in pixels, 0 returns the input unchanged. The border is replicated, so a constant
    image stays constant."""
    if sigma <= 0:
        return images
    radius = max(1, int(np.ceil(3 * sigma)))
    w = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    w = (w / w.sum()).tolist()
    out = images
    # Shifted-slice sums along one axis at a time: much faster than a convolution for
    # one channel and many small images. The last axis first.
    for axis in range(images.ndim - 1, 1, -1):
        n = out.shape[axis]
        x = _replicate_pad(out, axis, radius)
        out = sum(wk * x.narrow(axis, k, n) for k, wk in enumerate(w))
    return out


def _replicate_pad(x: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    first = x.narrow(axis, 0, 1)
    last = x.narrow(axis, x.shape[axis] - 1, 1)
    reps = [1] * x.ndim
    reps[axis] = radius
    return torch.cat([first.repeat(reps), x, last.repeat(reps)], dim=axis)


def lower_resolution(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Downsample the spatial axes by ``factor`` (0 < factor <= 1) and bring the images
    back to their size with linear interpolation: detail finer than 1/factor pixels is lost."""
    if factor >= 1:
        return images
    size = images.shape[2:]
    small = [max(1, int(round(s * factor))) for s in size]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    down = F.interpolate(images, size=small, mode="area")
    return F.interpolate(down, size=size, mode=mode, align_corners=False)


def apply_scanner(images: torch.Tensor, scanner: ScannerConfig, rng: np.random.Generator) -> torch.Tensor:
    """A site's acquisition of (N, C, *spatial) images in [0, 1]:
    ``scale * clip(x, 0, 1)**contrast + offset``, then a Gaussian blur of ``blur`` pixels
    (sigma), then the loss of ``resolution``, then additive Gaussian noise of standard
    deviation ``noise`` (drawn from ``rng``)."""
    out = scanner.intensity_scale * images.clamp(0, 1) ** scanner.contrast + scanner.intensity_offset
    out = gaussian_blur(out, scanner.blur)
    out = lower_resolution(out, scanner.resolution)
    if scanner.noise > 0:
        out = out + torch.from_numpy(rng.normal(0.0, scanner.noise, tuple(out.shape)).astype(np.float32))
    return out.to(torch.float32)


def shift_images(images: torch.Tensor, scanner: ScannerConfig, rng: np.random.Generator) -> torch.Tensor:
    """:func:`apply_scanner` on images of any intensity range: each image is mapped from
    its own [min, max] to [0, 1], acquired, and mapped back to that range."""
    if len(images) == 0:
        return images
    flat = images.reshape(len(images), -1)
    lo = flat.min(dim=1).values.view(-1, *[1] * (images.ndim - 1))
    hi = flat.max(dim=1).values.view(-1, *[1] * (images.ndim - 1))
    span = (hi - lo).clamp_min(1e-8)
    return apply_scanner((images - lo) / span, scanner, rng) * span + lo


def shift_site(site: SiteData, scanner: ScannerConfig, seed: int, index: int) -> SiteData:
    """``site`` with ``scanner``'s signature on the images of every split (masks and
    labels unchanged); the noise is drawn from ``default_rng([seed, index, 1])``."""
    rng = np.random.default_rng([seed, index, 1])

    def shifted(split: ArraySplit) -> ArraySplit:
        return ArraySplit(shift_images(split.images, scanner, rng).contiguous(), split.labels, split.names, split.spacing,
                          split.labeled)

    return SiteData(site.name, shifted(site.train), shifted(site.val), shifted(site.test), site.skipped)
