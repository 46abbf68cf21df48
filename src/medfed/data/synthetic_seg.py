"""Synthetic multi-site segmentation data, 2D or 3D: a body, an organ inside it and, in a
``prevalence`` share of the images, a lesion inside the organ, under each site's scanner.

An image is (1, S, S) or (1, S, S, S) float32, S = ``image_size``, with its int64 mask
(S, S) or (S, S, S). Image coordinates run over [-1, 1] along each axis. The clean image
(in [0, 1], before the scanner) is:

* a dark field (0.05) outside an elliptic (ellipsoidal in 3D) body of random centre,
  orientation and semi-axes, at intensity 0.4 with smooth texture at two scales (about
  S/6 and S/3 knots) that also runs through the organ;
* the organ, class 1: an ellipse/ellipsoid inside the body with its own random position,
  orientation and size (semi-axes 0.2-0.38, in the units where the image side is 2),
  0.2-0.3 brighter than the body;
* with probability ``prevalence`` (exactly ``round(prevalence * n)`` images of a split,
  at least one and at most n - 1 when n >= 2) a lesion: a disc/ball well inside the organ,
  of radius 0.25-0.5 of the organ's shortest semi-axis (at least 1.5 pixels) and
  ``lesion_contrast`` brighter than the organ (clipped at 1). It is labelled 2 when the
  task has 3 classes, else 1 (part of the organ); its mask is cut to the organ's.

Edges are soft (about one pixel wide) and the masks are the same shapes cut at their
midline. Intensities are clipped to [0, 1] before the site's scanner signature
(:func:`medfed.data.shift.apply_scanner`) is applied last.

Deterministic: site ``i`` of a job with seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, so it is the same run after run and does not depend
on the other sites. Its train, val and test splits are drawn, in that order, from that one
stream and hence from the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medfed.config import SyntheticSegmentationData, SyntheticSite, synthetic_size_problem
from medfed.core.errors import ConfigError
from medfed.data.base import ArraySplit, SiteData
from medfed.data.shift import apply_scanner
from medfed.data.synthetic import binary_labels

# Clean intensities in [0, 1]: the field outside the body, the body, the organ's excess
# over the body (drawn per image), and the texture amplitudes.
_FIELD, _BODY = 0.05, 0.4
_ORGAN_DELTA = (0.2, 0.3)
_TEXTURE_COARSE, _TEXTURE_FINE = 0.07, 0.04
_BODY_AXES = ((0.6, 0.85), (0.5, 0.75))  # the first semi-axis, the others
_ORGAN_OFFSET = 0.2  # organ centre: within this normalized radius of the body's
_ORGAN_AXES = (0.2, 0.38)
_LESION_RADIUS = (0.25, 0.5)  # of the organ's shortest semi-axis
_LESION_MIN_PX = 1.5
_LESION_REACH = 0.4  # lesion centre within this normalized radius of the organ's
_EDGE_PER_PX = 2.5  # soft edges: logit slope per pixel of radius (about 1 px wide)
_CHUNK_POINTS = 2**22  # images are rendered in chunks of about this many pixels


@dataclass(frozen=True)
class _Scene:
    """Drawn geometry of n images in d dimensions (float32 tensors)."""

    lesion: torch.Tensor  # (n,) 0/1
    body_c: torch.Tensor  # (n, d) centre
    body_r: torch.Tensor  # (n, d, d) rotation: world = c + R @ local
    body_a: torch.Tensor  # (n, d) semi-axes
    organ_c: torch.Tensor
    organ_r: torch.Tensor
    organ_a: torch.Tensor
    organ_delta: torch.Tensor  # (n,)
    lesion_c: torch.Tensor  # (n, d)
    lesion_rad: torch.Tensor  # (n,)
    coarse: torch.Tensor  # (n, 1, k, ..., k) texture knots
    fine: torch.Tensor


def _f32(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _rotations(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d, d) uniformly random orthogonal matrices (QR of Gaussian matrices with the
    signs fixed); a reflection is harmless, the shapes are symmetric."""
    q, r = np.linalg.qr(rng.normal(size=(n, d, d)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def _in_ball(n: int, d: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """(n, d) points drawn uniformly in the ball of ``radius`` about 0."""
    direction = rng.normal(size=(n, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return direction * radius * rng.uniform(0, 1, (n, 1)) ** (1 / d)


def _draw_scene(lesion: np.ndarray, d: int, size: int, rng: np.random.Generator) -> _Scene:
    n = len(lesion)
    px = 2.0 / size
    body_c = rng.uniform(-0.1, 0.1, (n, d))
    body_r = _rotations(n, d, rng)
    body_a = np.concatenate([rng.uniform(*_BODY_AXES[0], (n, 1)), rng.uniform(*_BODY_AXES[1], (n, d - 1))], axis=1)
    organ_c = body_c + np.einsum("nij,nj->ni", body_r, _in_ball(n, d, _ORGAN_OFFSET, rng) * body_a)
    organ_r = _rotations(n, d, rng)
    organ_a = rng.uniform(*_ORGAN_AXES, (n, d))
    organ_delta = rng.uniform(*_ORGAN_DELTA, n)
    lesion_c = organ_c + np.einsum("nij,nj->ni", organ_r, _in_ball(n, d, _LESION_REACH, rng) * organ_a)
    lesion_rad = np.maximum(rng.uniform(*_LESION_RADIUS, n) * organ_a.min(axis=1), _LESION_MIN_PX * px)
    k_coarse, k_fine = max(4, size // 6), max(8, size // 3)
    coarse = rng.uniform(-1, 1, (n, 1) + (k_coarse,) * d)
    fine = rng.uniform(-1, 1, (n, 1) + (k_fine,) * d)
    return _Scene(
        _f32(lesion), _f32(body_c), _f32(body_r), _f32(body_a), _f32(organ_c), _f32(organ_r), _f32(organ_a),
        _f32(organ_delta), _f32(lesion_c), _f32(lesion_rad), _f32(coarse), _f32(fine),
    )


def _features(points: torch.Tensor) -> torch.Tensor:
    """(F, P) monomials of degree <= 2 of the points (P, d): x_i x_j (i <= j), x_i, 1."""
    d = points.shape[1]
    quad = [points[:, i] * points[:, j] for i in range(d) for j in range(i, d)]
    return torch.stack(quad + [points[:, i] for i in range(d)] + [torch.ones(len(points))])


def _radius(feats: torch.Tensor, c: torch.Tensor, r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Normalized elliptic radius (n, P) at the points whose :func:`_features` are
    ``feats``: < 1 inside the ellipse of centre c (n, d), rotation r (n, d, d) and
    semi-axes a (n, d). The quadratic form (x - c)^T M (x - c), M = R diag(1/a^2) R^T,
    is expanded in monomials so that all images take one matrix product."""
    d = c.shape[1]
    m = torch.einsum("nik,nk,njk->nij", r, 1 / a**2, r)
    mc = torch.einsum("nij,nj->ni", m, c)
    coef = [m[:, i, j] * (1 if i == j else 2) for i in range(d) for j in range(i, d)]
    coef += [-2 * mc[:, i] for i in range(d)] + [(mc * c).sum(1)]
    return (torch.stack(coef, dim=1) @ feats).clamp_min_(0).sqrt_()


def _smooth(knots: torch.Tensor, size: int) -> torch.Tensor:
    """Upsample (n, 1, k, ...) knots to (n, size, ...) smooth noise in about [-1, 1]."""
    d = knots.ndim - 2
    mode = "bicubic" if d == 2 else "trilinear"
    return F.interpolate(knots, size=(size,) * d, mode=mode, align_corners=False)[:, 0].clamp(-1, 1)


def _render(s: _Scene, d: int, size: int, lesion_contrast: float, lesion_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images (n, 1, *sp) in [0, 1] and int64 masks (n, *sp)."""
    n = len(s.lesion)
    lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)  # pixel centres
    points = torch.stack(torch.meshgrid(*([lin] * d), indexing="ij"), dim=-1).reshape(-1, d)  # (P, d)
    feats = _features(points)
    half = size / 2.0  # pixels per unit of image coordinates
    spatial = (size,) * d

    def soft(radius: torch.Tensor, semi_px: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((1 - radius) * semi_px[:, None] * _EDGE_PER_PX)

    images, masks = [], []
    step = max(1, _CHUNK_POINTS // points.shape[0])
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        rb = _radius(feats, s.body_c[sl], s.body_r[sl], s.body_a[sl])
        ro = _radius(feats, s.organ_c[sl], s.organ_r[sl], s.organ_a[sl])
        eye = torch.eye(d).expand(len(rb), d, d)
        rl = _radius(feats, s.lesion_c[sl], eye, s.lesion_rad[sl, None].expand(-1, d))
        body = soft(rb, s.body_a[sl].min(1).values * half)
        organ = soft(ro, s.organ_a[sl].min(1).values * half) * body
        lesion = soft(rl, s.lesion_rad[sl] * half) * organ * s.lesion[sl, None]
        texture = (_TEXTURE_COARSE * _smooth(s.coarse[sl], size) + _TEXTURE_FINE * _smooth(s.fine[sl], size)).flatten(1)
        img = _FIELD + body * (_BODY - _FIELD + texture) + organ * s.organ_delta[sl, None] + lesion * lesion_contrast
        organ_mask = (ro < 1) & (rb < 1)
        lesion_mask = organ_mask & (rl < 1) & (s.lesion[sl, None] > 0)
        mask = organ_mask.long()
        mask[lesion_mask] = lesion_class
        images.append(img.clamp(0, 1).view(-1, 1, *spatial))
        masks.append(mask.view(-1, *spatial))
    return torch.cat(images), torch.cat(masks)


def make_seg_split(
    site: SyntheticSite, n: int, cfg: SyntheticSegmentationData, num_classes: int, rng: np.random.Generator
) -> ArraySplit:
    """``n`` images of ``site`` with their masks, drawn from ``rng``."""
    lesion = binary_labels(n, site.prevalence, rng)
    scene = _draw_scene(lesion, cfg.dims, cfg.image_size, rng)
    clean, masks = _render(scene, cfg.dims, cfg.image_size, cfg.lesion_contrast, 2 if num_classes == 3 else 1)
    images = apply_scanner(clean, site.scanner, rng).contiguous()
    return ArraySplit(images, masks.contiguous())


def make_seg_site(
    site: SyntheticSite, index: int, cfg: SyntheticSegmentationData, num_classes: int, seed: int
) -> SiteData:
    """Site number ``index`` of the job, drawn from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    return SiteData(
        name=site.name,
        train=make_seg_split(site, site.n_train, cfg, num_classes, rng),
        val=make_seg_split(site, site.n_val, cfg, num_classes, rng),
        test=make_seg_split(site, site.n_test, cfg, num_classes, rng),
    )


def make_synthetic_seg_sites(cfg: SyntheticSegmentationData, num_classes: int, seed: int) -> list[SiteData]:
    """One :class:`SiteData` per configured site, in the job's order. ``num_classes`` is
    the task's: 2 (background, organ with any lesion) or 3 (background, organ, lesion).
    Raises ConfigError, before drawing anything, when the images and masks would pass the
    memory bound of :func:`medfed.config.synthetic_size_problem`."""
    problem = synthetic_size_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)
    if num_classes not in (2, 3):
        raise ConfigError(
            "task.num_classes: synthetic segmentation has 2 classes (background, organ) or 3 "
            f"(background, organ, lesion), got {num_classes}"
        )
    return [make_seg_site(s, i, cfg, num_classes, seed) for i, s in enumerate(cfg.sites)]
