"""Generated MRI-like phantoms for the reconstruction task (``source: synthetic_phantoms``).

An image is (1, S, S) float32 in [0, 1], S = ``image_size``, coordinates over [-1, 1]:
a head-like ellipse of random centre, semi-axes and angle drawn at intensity 1 (its rim,
the "skull", 6-10% of its size thick) filled with tissue at 0.2-0.4, and inside it
``ellipses`` smaller ellipses (semi-axes 0.05-0.3, random angle and position) whose
intensities (-0.2 to +0.4) add up where they overlap, in the manner of the Shepp-Logan
phantom; clipped to [0, 1]. Edges are sharp, so undersampling leaves the aliasing a
reconstruction network has to remove.

Deterministic: site ``i`` of a job with seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, its train, val and test splits in that order; each
example's k-space mask from its own seed (data/kspace.py).
"""

from __future__ import annotations

import numpy as np
import torch

from medfed.config import PhantomData, ReconstructionTaskConfig, synthetic_size_problem
from medfed.core.errors import ConfigError
from medfed.data.base import SiteData
from medfed.data.kspace import undersample_site

_HEAD_AXES = ((0.7, 0.9), (0.55, 0.75))
_RIM = (0.06, 0.10)  # rim thickness, a share of the head's semi-axes
_TISSUE = (0.2, 0.4)
_INNER_AXES = (0.05, 0.3)
_INNER_DELTA = (-0.2, 0.4)
_CHUNK = 256  # images rendered at a time


def _inside(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, a: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(n, k, S, S) float 0/1: pixel (x, y) inside ellipse k of image n, of centre c (n, k, 2),
    semi-axes a (n, k, 2) and angle theta (n, k)."""
    dx = x - c[..., 0, None, None]
    dy = y - c[..., 1, None, None]
    cos, sin = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    return ((u / a[..., 0, None, None]) ** 2 + (v / a[..., 1, None, None]) ** 2 <= 1).float()


def make_phantoms(n: int, size: int, ellipses: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` phantoms (n, 1, size, size) float32 in [0, 1], drawn from ``rng``."""
    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    head_c = rng.uniform(-0.05, 0.05, (n, 1, 2))
    head_a = np.stack([rng.uniform(*_HEAD_AXES[0], n), rng.uniform(*_HEAD_AXES[1], n)], axis=1)[:, None]
    head_t = rng.uniform(-0.3, 0.3, (n, 1))
    rim = rng.uniform(*_RIM, (n, 1, 1))
    tissue = rng.uniform(*_TISSUE, n)
    # inner ellipses: centred well inside the brain, as a share of its semi-axes, then rotated with it
    rel = rng.uniform(-0.55, 0.55, (n, ellipses, 2)) * head_a * (1 - rim)
    cos, sin = np.cos(head_t)[..., None], np.sin(head_t)[..., None]
    inner_c = head_c + np.concatenate([rel[..., :1] * cos - rel[..., 1:] * sin, rel[..., :1] * sin + rel[..., 1:] * cos], -1)
    inner_a = rng.uniform(*_INNER_AXES, (n, ellipses, 2))
    inner_t = rng.uniform(0, np.pi, (n, ellipses))
    inner_d = rng.uniform(*_INNER_DELTA, (n, ellipses))

    lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    out = []
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(n, lo + _CHUNK))
        c, a, t = f32(head_c[sl]), f32(head_a[sl]), f32(head_t[sl])
        head = _inside(x, y, c, a, t)[:, 0]
        brain = _inside(x, y, c, a * (1 - f32(rim[sl])), t)[:, 0]
        inner = (_inside(x, y, f32(inner_c[sl]), f32(inner_a[sl]), f32(inner_t[sl])) * f32(inner_d[sl])[..., None, None]).sum(1)
        img = head - brain * (1 - f32(tissue[sl])[:, None, None]) + brain * inner
        out.append(img.clamp(0, 1)[:, None])
    return torch.cat(out).contiguous()


def make_phantom_sites(cfg: PhantomData, task: ReconstructionTaskConfig, seed: int, packed: bool = False) -> list[SiteData]:
    """One reconstruction site per configured site, in the job's order: phantoms as the
    ground truth, their zero-filled undersampling (at the site's ``acceleration``, else the
    task's) as the input (``packed``: with the masked k-space and the mask, for a k-space
    network, data/kspace_input.py). Raises ConfigError, before drawing, when they would not fit in
    memory (:func:`medfed.config.synthetic_size_problem`)."""
    problem = synthetic_size_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)
    sites = []
    for i, s in enumerate(cfg.sites):
        rng = np.random.default_rng([seed, i])
        truth = {split: make_phantoms(n, cfg.image_size, cfg.ellipses, rng)
                 for split, n in (("train", s.n_train), ("val", s.n_val), ("test", s.n_test))}
        acceleration = s.acceleration if s.acceleration is not None else task.acceleration
        sites.append(undersample_site(s.name, truth, acceleration, task.center_fraction, task.mask, seed, i, packed))
    return sites
