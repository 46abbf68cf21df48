import numpy as np
import pytest
import torch

from medfed.config import ScannerConfig, SyntheticData
from medfed.data.synthetic import apply_scanner, gaussian_blur, make_synthetic_sites


def _cfg(**site):
    base = {"name": "a", "n_train": 50, "n_val": 10, "n_test": 21, "prevalence": 0.3}
    return SyntheticData(source="synthetic", image_size=24, sites=[{**base, **site}, {**base, "name": "b"}])


def test_deterministic_by_seed_and_independent_by_site():
    a1, b1 = make_synthetic_sites(_cfg(), seed=5)
    a2, _ = make_synthetic_sites(_cfg(), seed=5)
    a3, _ = make_synthetic_sites(_cfg(), seed=6)
    assert torch.equal(a1.train.images, a2.train.images) and torch.equal(a1.test.labels, a2.test.labels)
    assert not torch.equal(a1.train.images, a3.train.images)
    assert not torch.equal(a1.train.images, b1.train.images)  # same settings, other site stream


def test_shapes_dtypes_and_exact_prevalence():
    (a, _) = make_synthetic_sites(_cfg(), seed=0)
    assert a.train.images.shape == (50, 1, 24, 24) and a.train.images.dtype == torch.float32
    assert a.train.labels.dtype == torch.int64
    assert int(a.train.labels.sum()) == 15 and int(a.val.labels.sum()) == 3 and int(a.test.labels.sum()) == 6


def test_extreme_prevalence_keeps_both_classes():
    (a, _) = make_synthetic_sites(_cfg(prevalence=0.01, n_test=5), seed=0)
    assert int(a.test.labels.sum()) == 1


def test_scanner_signature_changes_intensity():
    rng = np.random.default_rng(0)
    img = torch.full((2, 1, 8, 8), 0.5)
    out = apply_scanner(img, ScannerConfig(intensity_scale=2.0, intensity_offset=0.1, contrast=1.0), rng)
    assert torch.allclose(out, torch.full_like(out, 1.1))
    out = apply_scanner(img, ScannerConfig(contrast=2.0), rng)
    assert torch.allclose(out, torch.full_like(out, 0.25))
    noisy = apply_scanner(img, ScannerConfig(noise=0.1), rng)
    assert 0.07 < float((noisy - img).std()) < 0.13


def test_blur_preserves_mean_and_smooths():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    y = gaussian_blur(x, 1.0)
    assert y.sum() == pytest.approx(1.0, abs=1e-5) and float(y.max()) < 0.2
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_sites_differ_by_signature():
    cfg = SyntheticData(
        source="synthetic", image_size=24,
        sites=[{"name": "dim", "n_train": 40, "n_test": 5, "scanner": {"intensity_scale": 0.5}},
               {"name": "bright", "n_train": 40, "n_test": 5, "scanner": {"intensity_scale": 1.5, "intensity_offset": 0.2}}],
    )
    dim, bright = make_synthetic_sites(cfg, 0)
    assert float(bright.train.images.mean()) > 2 * float(dim.train.images.mean())
