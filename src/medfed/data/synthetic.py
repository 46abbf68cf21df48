"""Synthetic multi-site 2D images: a lesion present (label 1) or absent (label 0) on an
anatomical background, with each site's own scanner signature, prevalence and size.

Deterministic: site ``i`` of a job with seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, independent of the other sites.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medfed.config import ScannerConfig, SyntheticData, SyntheticSite
from medfed.data.base import ArraySplit, SiteData


def _labels(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(prevalence * n) positives (at least one of each class when n >= 2)."""
    n_pos = int(round(prevalence * n))
    if n >= 2:
        n_pos = min(max(n_pos, 1), n - 1)
    y = np.zeros(n, dtype=np.int64)
    y[:n_pos] = 1
    return rng.permutation(y)


def _smooth_noise(n: int, size: int, coarse: int, rng: np.random.Generator) -> torch.Tensor:
    """Low-frequency texture in [-1, 1]: coarse random grid upsampled bicubically."""
    grid = torch.from_numpy(rng.uniform(-1, 1, (n, 1, coarse, coarse)).astype(np.float32))
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images; sigma in pixels (0: unchanged)."""
    if sigma <= 0:
        return images
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, k.view(1, 1, 1, -1))
    return F.conv2d(out, k.view(1, 1, -1, 1))


def apply_scanner(images: torch.Tensor, scanner: ScannerConfig, rng: np.random.Generator) -> torch.Tensor:
    """A site's acquisition: gain and offset after a contrast (gamma) curve, blur, noise."""
    out = scanner.intensity_scale * images.clamp(0, 1) ** scanner.contrast + scanner.intensity_offset
    out = gaussian_blur(out, scanner.blur)
    if scanner.noise > 0:
        out = out + torch.from_numpy(rng.normal(0, scanner.noise, out.shape).astype(np.float32))
    return out


def render(labels: np.ndarray, size: int, lesion_contrast: float, rng: np.random.Generator) -> torch.Tensor:
    """Clean images in [0, 1], shape (N, 1, size, size), before any scanner effect."""
    n = len(labels)
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")  # (S, S)

    def draw(*shape_low_high: tuple[float, float]) -> list[torch.Tensor]:
        return [torch.from_numpy(rng.uniform(lo, hi, n).astype(np.float32)).view(n, 1, 1) for lo, hi in shape_low_high]

    # body: a rotated ellipse with a soft edge
    cx, cy, a, b, th = draw((-0.12, 0.12), (-0.12, 0.12), (0.6, 0.85), (0.45, 0.7), (0, np.pi))
    xr = (xx - cx) * torch.cos(th) + (yy - cy) * torch.sin(th)
    yr = -(xx - cx) * torch.sin(th) + (yy - cy) * torch.cos(th)
    r_body = torch.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    body = torch.sigmoid((1 - r_body) * 12)
    # an inner organ: a darker ellipse inside the body
    ox, oy, oa, ob = draw((-0.25, 0.25), (-0.25, 0.25), (0.12, 0.3), (0.1, 0.25))
    organ = torch.sigmoid((1 - torch.sqrt(((xx - cx - ox) / oa) ** 2 + ((yy - cy - oy) / ob) ** 2)) * 8)
    texture = _smooth_noise(n, size, max(4, size // 6), rng)[:, 0]
    img = 0.05 + body * (0.5 + 0.12 * texture - 0.18 * organ)

    # lesion: a Gaussian blob inside the body, for positives only
    rho, phi, rad_px, strength = draw((0.0, 0.6), (0, 2 * np.pi), (1.5, 3.5), (0.7, 1.0))
    lx = cx + rho * a * torch.cos(phi)
    ly = cy + rho * b * torch.sin(phi)
    r_norm = rad_px * (size / 32) * 2 / size
    blob = torch.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * r_norm**2))
    present = torch.from_numpy(labels.astype(np.float32)).view(n, 1, 1)
    img = img + present * lesion_contrast * strength * blob * body
    return img.unsqueeze(1).clamp(0, 1)


def make_split(site: SyntheticSite, n: int, cfg: SyntheticData, rng: np.random.Generator) -> ArraySplit:
    labels = _labels(n, site.prevalence, rng)
    clean = render(labels, cfg.image_size, cfg.lesion_contrast, rng)
    images = apply_scanner(clean, site.scanner, rng).contiguous()
    return ArraySplit(images, torch.from_numpy(labels))


def make_site(site: SyntheticSite, index: int, cfg: SyntheticData, seed: int) -> SiteData:
    rng = np.random.default_rng([seed, index])
    return SiteData(
        name=site.name,
        train=make_split(site, site.n_train, cfg, rng),
        val=make_split(site, site.n_val, cfg, rng),
        test=make_split(site, site.n_test, cfg, rng),
    )


def make_synthetic_sites(cfg: SyntheticData, seed: int) -> list[SiteData]:
    """One :class:`SiteData` per configured site, in the job's order."""
    return [make_site(s, i, cfg, seed) for i, s in enumerate(cfg.sites)]
