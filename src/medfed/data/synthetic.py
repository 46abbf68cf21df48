"""Synthetic multi-site 2D images: a lesion present (label 1) or absent (label 0) on an
anatomical background, with each site's own scanner signature, prevalence and size.

An image is (1, S, S) float32, S = ``image_size``: a dark field, a rotated elliptic body
with smooth texture at two scales and a darker inner organ, and for positives a small
Gaussian blob (radius 1.5-4 px at S = 32, scaled with S / 32) placed inside the body whose
peak is ``lesion_contrast`` above the tissue around it. The site's scanner signature
(:func:`apply_scanner`) comes last.

Deterministic: site ``i`` of a job with seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, so it is the same run after run and does not depend
on the other sites. Its train, val and test splits are drawn, in that order, from that one
stream and hence from the same distribution.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medfed.config import SyntheticData, SyntheticSite, synthetic_size_problem
from medfed.core.errors import ConfigError
from medfed.data.base import ArraySplit, SiteData
from medfed.data.shift import apply_scanner

# Tissue intensities in [0, 1] before the scanner: the field outside the body, the body,
# how much its coarse and fine texture move it, and how much darker the inner organ is.
_FIELD, _BODY, _ORGAN = 0.05, 0.5, 0.18
_TEXTURE_COARSE, _TEXTURE_FINE = 0.12, 0.06
_LESION_RADIUS_PX = (1.5, 4.0)  # at S = 32


def binary_labels(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64 in {0, 1}, shuffled, with exactly ``round(prevalence * n)`` ones,
    clipped to [1, n - 1] when n >= 2 so that both classes are present."""
    n_pos = int(round(prevalence * n))
    if n >= 2:
        n_pos = min(max(n_pos, 1), n - 1)
    y = np.zeros(n, dtype=np.int64)
    y[:n_pos] = 1
    return rng.permutation(y)


def _uniform(rng: np.random.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """(n, 1, 1) float32 draws, shaped to broadcast against (n, S, S) images."""
    return torch.from_numpy(rng.uniform(low, high, n).astype(np.float32)).view(n, 1, 1)


def _smooth_noise(n: int, size: int, knots: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, size, size) smooth noise in about [-1, 1]: a random (knots x knots) grid
    upsampled bicubically, so its features are about ``size / knots`` pixels wide."""
    grid = torch.from_numpy(rng.uniform(-1, 1, (n, 1, knots, knots)).astype(np.float32))
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def _texture(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, size, size) tissue texture: broad shading (about 6 px features) plus finer
    structure (about 3 px) that a lesion can hide in, so detection is not trivial."""
    coarse = _smooth_noise(n, size, max(4, size // 6), rng).clamp(-1, 1)
    fine = _smooth_noise(n, size, max(8, size // 3), rng).clamp(-1, 1)
    return _TEXTURE_COARSE * coarse + _TEXTURE_FINE * fine


def render(labels: np.ndarray, size: int, lesion_contrast: float, rng: np.random.Generator) -> torch.Tensor:
    """Clean images, (N, 1, size, size) float32 in [0, 1], before any scanner effect;
    ``labels`` (N,) in {0, 1} says which images get a lesion."""
    n = len(labels)
    lin = torch.linspace(-1, 1, size)  # image coordinates, 2 / size per pixel
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")  # (S, S)

    # body: a rotated ellipse with a soft edge, centre (cx, cy), semi-axes (a, b)
    cx, cy = _uniform(rng, n, -0.12, 0.12), _uniform(rng, n, -0.12, 0.12)
    a, b, th = _uniform(rng, n, 0.6, 0.85), _uniform(rng, n, 0.45, 0.7), _uniform(rng, n, 0, np.pi)
    cos, sin = torch.cos(th), torch.sin(th)
    u = (xx - cx) * cos + (yy - cy) * sin  # coordinates along the body's axes
    v = -(xx - cx) * sin + (yy - cy) * cos
    body = torch.sigmoid((1 - torch.sqrt((u / a) ** 2 + (v / b) ** 2)) * 12)
    # an inner organ: a darker ellipse, placed in body coordinates so it rotates with it
    ou, ov = _uniform(rng, n, -0.25, 0.25), _uniform(rng, n, -0.2, 0.2)
    oa, ob = _uniform(rng, n, 0.12, 0.3), _uniform(rng, n, 0.1, 0.25)
    organ = torch.sigmoid((1 - torch.sqrt(((u - ou) / oa) ** 2 + ((v - ov) / ob) ** 2)) * 8)
    img = _FIELD + body * (_BODY - _FIELD + _texture(n, size, rng) - _ORGAN * organ)

    # lesion: a Gaussian blob well inside the body (at most 0.6 of the way to its edge)
    rho, phi = torch.sqrt(_uniform(rng, n, 0.0, 0.36)), _uniform(rng, n, 0, 2 * np.pi)
    lu, lv = rho * a * torch.cos(phi), rho * b * torch.sin(phi)
    sigma = _uniform(rng, n, *_LESION_RADIUS_PX) * (size / 32) * (2 / size)
    blob = torch.exp(-((u - lu) ** 2 + (v - lv) ** 2) / (2 * sigma**2))
    present = torch.from_numpy(labels.astype(np.float32)).view(n, 1, 1)
    img = img + present * lesion_contrast * blob * body
    return img.unsqueeze(1).clamp(0, 1)


def make_split(site: SyntheticSite, n: int, cfg: SyntheticData, rng: np.random.Generator) -> ArraySplit:
    """``n`` images of ``site``: (n, 1, S, S) float32 and (n,) int64 labels."""
    labels = binary_labels(n, site.prevalence, rng)
    clean = render(labels, cfg.image_size, cfg.lesion_contrast, rng)
    images = apply_scanner(clean, site.scanner, rng).contiguous()
    return ArraySplit(images, torch.from_numpy(labels))


def make_site(site: SyntheticSite, index: int, cfg: SyntheticData, seed: int) -> SiteData:
    """Site number ``index`` of the job, drawn from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    return SiteData(
        name=site.name,
        train=make_split(site, site.n_train, cfg, rng),
        val=make_split(site, site.n_val, cfg, rng),
        test=make_split(site, site.n_test, cfg, rng),
    )


def make_synthetic_sites(cfg: SyntheticData, seed: int) -> list[SiteData]:
    """One :class:`SiteData` per configured site, in the job's order. Raises ConfigError,
    before drawing anything, when the images would pass the memory bound of
    :func:`medfed.config.synthetic_size_problem`."""
    problem = synthetic_size_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)
    return [make_site(s, i, cfg, seed) for i, s in enumerate(cfg.sites)]
