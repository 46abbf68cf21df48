import pytest
import torch

from medfed.config import SyntheticSegmentationData
from medfed.core.errors import ConfigError
from medfed.data.synthetic_seg import make_synthetic_seg_sites

SPLITS = ("train", "val", "test")


def _cfg(*sites, dims=2, size=32, contrast=0.3):
    base = {"name": "a", "n_train": 40, "n_val": 10, "n_test": 20, "prevalence": 0.3}
    sites = sites or ({}, {"name": "b"})
    return SyntheticSegmentationData(
        source="synthetic_segmentation", dims=dims, image_size=size, lesion_contrast=contrast,
        sites=[{**base, **s} for s in sites],
    )


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
@pytest.mark.parametrize("k", [2, 3])
def test_shapes_dtypes_and_classes(dims, size, k):
    sites = make_synthetic_seg_sites(_cfg(dims=dims, size=size), k, seed=0)
    assert [s.name for s in sites] == ["a", "b"]
    for split, n in zip(SPLITS, (40, 10, 20)):
        d = sites[0].split(split)
        assert d.images.shape == (n, 1) + (size,) * dims and d.images.dtype == torch.float32
        assert d.labels.shape == (n,) + (size,) * dims and d.labels.dtype == torch.int64
        assert d.spatial_dims == dims and torch.isfinite(d.images).all()
        assert set(d.labels.unique().tolist()) == set(range(k))
        per_image = d.labels.flatten(1)
        assert (per_image == 1).any(1).all()  # every image has its organ
        assert (per_image == 0).float().mean() > 0.8  # mostly background


def test_lesion_prevalence_and_labels():
    cfg = _cfg({"prevalence": 0.3}, {"name": "b", "prevalence": 0.7})
    three = make_synthetic_seg_sites(cfg, 3, seed=1)
    two = make_synthetic_seg_sites(cfg, 2, seed=1)
    for s3, s2, prev in zip(three, two, (0.3, 0.7)):
        for split in SPLITS:
            m3, m2 = s3.split(split).labels, s2.split(split).labels
            with_lesion = (m3 == 2).flatten(1).any(1)
            assert int(with_lesion.sum()) == round(prev * len(m3))
            # with 2 classes the lesion is part of the organ; nothing else changes
            assert torch.equal(m2, (m3 > 0).long())
            assert torch.equal(s3.split(split).images, s2.split(split).images)


def test_lesion_lies_in_the_organ_and_is_brighter():
    d = make_synthetic_seg_sites(_cfg({"n_train": 60, "prevalence": 0.5}, size=48), 3, seed=2)[0].train
    x, m = d.images[:, 0], d.labels
    assert x[m == 2].mean() > x[m == 1].mean() + 0.15
    assert x[m == 1].mean() > x[m == 0].mean() + 0.2
    # the lesion lies well inside the organ: hardly a lesion pixel has background next to it
    lesion = m == 2
    pad = torch.nn.functional.pad((m == 0).float()[:, None], (1, 1, 1, 1))
    near_bg = torch.nn.functional.max_pool2d(pad, 3, stride=1)[:, 0] > 0
    assert (lesion & near_bg).sum() <= 0.03 * lesion.sum()


def test_deterministic_by_seed_and_sites_independent():
    cfg = _cfg()
    a = make_synthetic_seg_sites(cfg, 3, seed=5)
    b = make_synthetic_seg_sites(cfg, 3, seed=5)
    c = make_synthetic_seg_sites(cfg, 3, seed=6)
    for split in SPLITS:
        assert torch.equal(a[0].split(split).images, b[0].split(split).images)
        assert torch.equal(a[1].split(split).labels, b[1].split(split).labels)
        assert not torch.equal(a[0].split(split).labels, c[0].split(split).labels)
    assert not torch.equal(a[0].train.labels, a[1].train.labels)
    # site 0 does not depend on the other sites
    alone = make_synthetic_seg_sites(_cfg({}, {"name": "b", "n_train": 7, "scanner": {"noise": 0.2}}), 3, seed=5)
    assert torch.equal(alone[0].test.images, a[0].test.images)
    assert torch.equal(alone[0].test.labels, a[0].test.labels)


def test_scanner_changes_images_not_masks():
    plain = make_synthetic_seg_sites(_cfg({}), 3, seed=3)[0]
    dark = make_synthetic_seg_sites(_cfg({"scanner": {"intensity_scale": 0.5, "contrast": 1.5}}), 3, seed=3)[0]
    for split in SPLITS:
        assert torch.equal(plain.split(split).labels, dark.split(split).labels)
        assert dark.split(split).images.mean() < 0.6 * plain.split(split).images.mean()
    sites = make_synthetic_seg_sites(
        _cfg({}, {"name": "b", "scanner": {"noise": 0.1, "blur": 1.0, "resolution": 0.5, "intensity_offset": 0.2}}),
        2, seed=3,
    )
    bg = [s.train.images[:, 0][s.train.labels == 0] for s in sites]
    assert bg[1].mean() > bg[0].mean() + 0.15
    # the noise shows in the field outside the body (flat before the scanner)
    corner = [s.train.images[:, 0, :3, :3] for s in sites]
    assert corner[0].std() < 0.01
    assert corner[1].std() > 0.05


def test_3d_volumes_each_have_their_own_anatomy():
    cfg = _cfg({"n_train": 50, "n_val": 5, "n_test": 5, "prevalence": 0.5}, dims=3, size=32)
    d = make_synthetic_seg_sites(cfg, 3, seed=0)[0].train
    assert d.images.shape == (50, 1, 32, 32, 32)
    assert int((d.labels == 2).flatten(1).any(1).sum()) == 25
    flat = d.labels.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(50) for j in range(i))


def test_other_class_counts_are_refused():
    with pytest.raises(ConfigError, match="num_classes"):
        make_synthetic_seg_sites(_cfg(), 4, seed=0)
