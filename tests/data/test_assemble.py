"""Records to site tensors: splits drawn or kept, shapes checked, feature shift applied."""

import numpy as np
import pytest
import torch

from medfed.config import ScannerConfig, SplitConfig, TaskConfig, parse_job
from medfed.core.errors import DataError
from medfed.data.base import Record, SiteData, SiteRecords
from medfed.data.shift import lower_resolution, shift_images, shift_site
from medfed.data.sites import assemble_site, build_sites, check_site, describe_sites, stack_records


def _rec(i, split=None, shape=(1, 8, 8), label=0):
    return Record(f"img{i}.png", np.full(shape, i / 100, np.float32), np.array(label, np.int64), None, split)


def test_undivided_records_are_drawn_into_three_splits_repeatably():
    read = SiteRecords("a", [_rec(i) for i in range(20)])
    site = assemble_site(read, None, SplitConfig(val=0.2, test=0.3), seed=1, index=0)
    sizes = [len(site.split(s)) for s in ("train", "val", "test")]
    assert sizes == [10, 4, 6]
    names = [set(site.split(s).names) for s in ("train", "val", "test")]
    assert set.union(*names) == {f"img{i}.png" for i in range(20)} and sum(map(len, names)) == 20
    again = assemble_site(read, None, SplitConfig(val=0.2, test=0.3), seed=1, index=0)
    assert again.test.names == site.test.names
    other = assemble_site(read, None, SplitConfig(val=0.2, test=0.3), seed=2, index=0)
    assert other.test.names != site.test.names


def test_declared_splits_are_kept_and_a_missing_val_is_drawn_from_train():
    recs = [_rec(i, "train") for i in range(10)] + [_rec(100 + i, "test") for i in range(3)]
    site = assemble_site(SiteRecords("a", recs), None, SplitConfig(val=0.2, test=0.2), seed=0, index=0)
    assert site.test.names == ("img100.png", "img101.png", "img102.png")
    assert len(site.val) == 2 and len(site.train) == 8
    assert not set(site.val.names) & set(site.train.names)


def test_images_of_different_sizes_are_an_error_that_suggests_a_resize():
    recs = [_rec(0), _rec(1), _rec(2, shape=(1, 9, 8)), _rec(3), _rec(4)]
    with pytest.raises(DataError, match=r"site 'a' train split: images differ in size.*'img2.png'.*resize or crop_or_pad"):
        stack_records(recs, "site 'a' train split")


def test_a_site_with_no_records_or_too_few_is_named():
    with pytest.raises(DataError, match=r"site 'empty' has no examples \(2 file\(s\) skipped"):
        assemble_site(SiteRecords("empty", [], [("x.png", "bad"), ("y.png", "bad")]), None, SplitConfig(), 0, 0)
    with pytest.raises(DataError, match="site 'tiny' has no examples in its val split"):
        assemble_site(SiteRecords("tiny", [_rec(0), _rec(1)]), None, SplitConfig(), 0, 0)


def test_masks_are_checked_against_the_images_and_the_classes():
    from medfed.config import SegmentationTaskConfig
    from medfed.data.base import ArraySplit

    task = SegmentationTaskConfig(kind="segmentation", num_classes=2)
    good = ArraySplit(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64))
    check_site(SiteData("s", good, good, good), task)
    wrong_shape = ArraySplit(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 5, dtype=torch.int64))
    with pytest.raises(DataError, match=r"site 's' val split: masks must be int64 of the images' spatial shape \(4, 4\)"):
        check_site(SiteData("s", good, wrong_shape, good), task)
    bad_class = ArraySplit(torch.zeros(2, 1, 4, 4), torch.full((2, 4, 4), 2, dtype=torch.int64))
    with pytest.raises(DataError, match=r"site 's' test split: mask values must be class indices in 0..1, found 2..2"):
        check_site(SiteData("s", good, good, bad_class), task)
    assert describe_sites([SiteData("s", good, good, good)], task)[0].class_counts["train"] == [2, 0]


def test_lower_resolution_removes_detail_but_keeps_the_size_2d_and_3d():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0, 1, (2, 1, 16, 16)).astype(np.float32))
    y = lower_resolution(x, 0.5)
    assert y.shape == x.shape and float(y.std()) < float(x.std())
    v = torch.from_numpy(rng.uniform(0, 1, (1, 1, 8, 8, 8)).astype(np.float32))
    assert lower_resolution(v, 0.5).shape == v.shape
    assert torch.equal(lower_resolution(x, 1.0), x)


def test_shift_keeps_each_image_in_its_own_range_and_changes_it():
    x = torch.linspace(-1000, 400, 64).reshape(1, 1, 8, 8)  # CT-like, far outside [0, 1]
    out = shift_images(x, ScannerConfig(contrast=2.0), np.random.default_rng(0))
    assert float(out.min()) == pytest.approx(-1000, abs=1e-2) and float(out.max()) == pytest.approx(400, abs=1e-2)
    assert not torch.allclose(out, x)
    assert torch.allclose(shift_images(x, ScannerConfig(), np.random.default_rng(0)), x, atol=1e-3)


def test_feature_shift_in_a_job_changes_only_the_named_site():
    base = {
        "name": "t", "output": "o", "rounds": 1, "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
        "data": {"source": "synthetic", "image_size": 16, "sites": [
            {"name": "a", "n_train": 6, "n_val": 3, "n_test": 3}, {"name": "b", "n_train": 6, "n_val": 3, "n_test": 3}]},
    }
    plain = build_sites(parse_job(base))
    shifted = build_sites(parse_job({**base, "feature_shift": {"b": {"intensity_scale": 0.5, "noise": 0.05, "resolution": 0.5}}}))
    assert torch.equal(plain[0].train.images, shifted[0].train.images)
    assert not torch.allclose(plain[1].train.images, shifted[1].train.images)
    assert torch.equal(plain[1].train.labels, shifted[1].train.labels)
    again = build_sites(parse_job({**base, "feature_shift": {"b": {"noise": 0.05}}}))
    assert torch.equal(again[1].test.images, build_sites(parse_job({**base, "feature_shift": {"b": {"noise": 0.05}}}))[1].test.images)


def test_shift_site_keeps_names_and_skipped():
    from medfed.data.base import ArraySplit

    split = ArraySplit(torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.int64), ("x", "y", "z"))
    site = SiteData("s", split, split, split, skipped=(("bad.png", "truncated"),))
    out = shift_site(site, ScannerConfig(noise=0.1), 0, 0)
    assert out.train.names == ("x", "y", "z") and out.skipped == site.skipped


def test_classification_labels_from_records_keep_their_type():
    recs = [Record(f"{i}", np.zeros((1, 4, 4), np.float32), np.array([1.0, 0.0], np.float32)) for i in range(3)]
    split = stack_records(recs, "x")
    assert split.labels.dtype == torch.float32 and split.labels.shape == (3, 2)
    assert describe_sites([SiteData("m", split, split, split)], TaskConfig(labels="multilabel", num_classes=2))[0] \
        .class_counts["train"] == [3, 0]
