
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.config import ScannerConfig, SyntheticData
from medfed.data.shift import apply_scanner, gaussian_blur
from medfed.data.synthetic import binary_labels, make_synthetic_sites, render

SPLITS = ("train", "val", "test")


def _cfg(*sites, size=24, contrast=0.3):
    base = {"name": "a", "n_train": 50, "n_val": 10, "n_test": 21, "prevalence": 0.3}
    sites = sites or ({}, {"name": "b"})
    return SyntheticData(source="synthetic", image_size=size, lesion_contrast=contrast,
                         sites=[{**base, **s} for s in sites])


def _same(x, y):
    return all(torch.equal(x.split(s).images, y.split(s).images) and torch.equal(x.split(s).labels, y.split(s).labels)
               for s in SPLITS)


def test_same_seed_gives_identical_sites_and_another_seed_does_not():
    a1, b1 = make_synthetic_sites(_cfg(), seed=5)
    a2, b2 = make_synthetic_sites(_cfg(), seed=5)
    a3, _ = make_synthetic_sites(_cfg(), seed=6)
    assert _same(a1, a2) and _same(b1, b2)
    assert not torch.equal(a1.train.images, a3.train.images)
    assert not torch.equal(a1.train.images, b1.train.images)  # same settings, its own stream


def test_a_site_does_not_depend_on_the_other_sites():
    (a1, _) = make_synthetic_sites(_cfg({}, {"name": "b", "n_train": 7, "scanner": {"noise": 0.3}}), seed=1)
    (a2, _) = make_synthetic_sites(_cfg({}, {"name": "b", "n_train": 90}), seed=1)
    assert _same(a1, a2)


def test_shapes_dtypes_and_names():
    a, b = make_synthetic_sites(_cfg(size=40), seed=0)
    assert (a.name, b.name) == ("a", "b")
    for s, n in zip(SPLITS, (50, 10, 21)):
        split = a.split(s)
        assert split.images.shape == (n, 1, 40, 40) and split.images.dtype == torch.float32
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert bool(torch.isfinite(split.images).all())
        assert set(split.labels.tolist()) == {0, 1}


def test_exact_prevalence_per_split():
    (a, _) = make_synthetic_sites(_cfg(), seed=0)
    # round(0.3 * n) for n = 50, 10, 21
    assert [int(a.split(s).labels.sum()) for s in SPLITS] == [15, 3, 6]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), p=st.floats(0.001, 0.999), seed=st.integers(0, 2**32 - 1))
def test_binary_labels_count_is_exact_and_both_classes_present(n, p, seed):
    y = binary_labels(n, p, np.random.default_rng(seed))
    expected = round(p * n) if n < 2 else min(max(round(p * n), 1), n - 1)
    assert y.dtype == np.int64 and y.shape == (n,) and int(y.sum()) == expected
    assert set(np.unique(y)) <= {0, 1}


def test_labels_are_shuffled():
    y = binary_labels(100, 0.5, np.random.default_rng(0))
    assert y[:50].sum() not in (0, 50)


def test_lesion_adds_lesion_contrast_to_positives_only():
    n = 64
    clean_neg = render(np.zeros(n, np.int64), 32, 0.3, np.random.default_rng(3))
    clean_pos = render(np.ones(n, np.int64), 32, 0.3, np.random.default_rng(3))
    diff = (clean_pos - clean_neg).flatten(1).max(1).values  # same background, lesion or not
    assert float(diff.min()) > 0.2 and float(diff.max()) <= 0.3 + 1e-6
    mixed = render(np.array([0, 1] * (n // 2)), 32, 0.3, np.random.default_rng(3))
    assert torch.equal(mixed[0::2], clean_neg[0::2])
    assert 0.0 <= float(clean_pos.min()) and float(clean_pos.max()) <= 1.0


def test_background_is_a_bright_body_on_a_dark_field():
    img = render(np.zeros(200, np.int64), 32, 0.3, np.random.default_rng(0))[:, 0]
    corners = torch.cat([img[:, :3, :3], img[:, -3:, -3:]], 1)
    assert float(corners.mean()) < 0.1 and float(img[:, 14:18, 14:18].mean()) > 0.25


def test_scanner_formula_noise_and_blur():
    rng = np.random.default_rng(0)
    img = torch.full((2, 1, 8, 8), 0.5)
    out = apply_scanner(img, ScannerConfig(intensity_scale=2.0, intensity_offset=0.1), rng)
    assert torch.allclose(out, torch.full_like(out, 1.1))
    out = apply_scanner(img, ScannerConfig(contrast=2.0), rng)
    assert torch.allclose(out, torch.full_like(out, 0.25))
    out = apply_scanner(torch.full((1, 1, 4, 4), 1.7), ScannerConfig(), rng)  # clipped to 1 first
    assert torch.allclose(out, torch.ones_like(out))
    noisy = apply_scanner(torch.full((4, 1, 32, 32), 0.5), ScannerConfig(noise=0.1), rng)
    assert noisy.dtype == torch.float32 and 0.09 < float(noisy.std()) < 0.11
    blurred = apply_scanner(img, ScannerConfig(blur=1.5), rng)  # a constant image stays constant
    assert torch.allclose(blurred, torch.full_like(blurred, 0.5))


def test_blur_preserves_mass_and_smooths():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    y = gaussian_blur(x, 1.0)
    assert y.sum() == pytest.approx(1.0, abs=1e-5) and float(y.max()) < 0.2
    assert float(y[0, 0, 7, 8]) == pytest.approx(float(y[0, 0, 8, 7]))  # isotropic
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_mean_intensity_follows_the_site_signature():
    plain = _cfg({"n_train": 40}, size=24)
    bright = _cfg({"n_train": 40, "scanner": {"intensity_scale": 1.5, "intensity_offset": 0.2}}, size=24)
    dim = _cfg({"n_train": 40, "scanner": {"intensity_scale": 0.5, "intensity_offset": -0.05}}, size=24)
    (p,), (b,), (d,) = (make_synthetic_sites(c, seed=2) for c in (plain, bright, dim))
    # same seed and site index: same anatomy, only the scanner differs
    assert torch.allclose(b.train.images, 1.5 * p.train.images + 0.2, atol=1e-6)
    assert torch.allclose(d.train.images, 0.5 * p.train.images - 0.05, atol=1e-6)
    assert float(b.train.images.mean()) > 2 * float(d.train.images.mean()) + 0.1
