import numpy as np
import pytest
import torch

from medfed.config import TaskConfig, parse_job
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData
from medfed.data.sites import build_sites, check_site, describe_sites

BINARY = TaskConfig(labels="binary")


def _job(data, task=None):
    return parse_job({"name": "t", "output": "o", "rounds": 1, "model": {"name": "small_cnn"},
                      "task": task or {"labels": "binary"}, "data": data})


def _medmnist(tmp_path, n=(40, 10, 20)):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, k in zip(("train", "val", "test"), n):
        arrays[f"{s}_images"] = rng.integers(0, 256, (k, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(k) % 2).reshape(k, 1)
    np.savez(tmp_path / "mini.npz", **arrays)
    return tmp_path / "mini.npz"


def test_synthetic_job_builds_and_describes():
    job = _job({"source": "synthetic", "image_size": 16,
                "sites": [{"name": "a", "n_train": 10, "n_val": 4, "n_test": 4, "prevalence": 0.5},
                          {"name": "b", "n_train": 6, "n_val": 3, "n_test": 5, "prevalence": 0.2}]})
    sites = build_sites(job)
    assert [s.name for s in sites] == ["a", "b"] and sites[0].train.images.shape == (10, 1, 16, 16)
    assert [r.model_dump(mode="json") for r in describe_sites(sites, job.task)] == [
        {"name": "a", "train": 10, "val": 4, "test": 4,
         "class_counts": {"train": [5, 5], "val": [2, 2], "test": [2, 2]},
         "shape": [1, 16, 16], "held_out": False, "skipped": 0, "skipped_files": []},
        {"name": "b", "train": 6, "val": 3, "test": 5,
         "class_counts": {"train": [5, 1], "val": [2, 1], "test": [4, 1]},
         "shape": [1, 16, 16], "held_out": False, "skipped": 0, "skipped_files": []},
    ]
    assert all(torch.equal(x.test.images, y.test.images) for x, y in zip(sites, build_sites(job)))


def test_synthetic_data_refuses_a_multiclass_task():
    job = _job({"source": "synthetic", "sites": [{"name": "a", "n_train": 10, "n_test": 4}]},
               task={"labels": "multiclass", "num_classes": 3})
    with pytest.raises(DataError, match="synthetic data is binary.*'multiclass' with 3 classes"):
        build_sites(job)


def test_medmnist_job_is_read_and_partitioned(tmp_path):
    path = _medmnist(tmp_path)
    job = _job({"source": "medmnist", "path": str(path),
                "partition": {"method": "iid", "sites": ["h1", "h2"]}})
    sites = build_sites(job)
    rows = describe_sites(sites, job.task)
    assert [r.name for r in rows] == ["h1", "h2"]
    assert [r.train for r in rows] == [20, 20] and [r.test for r in rows] == [10, 10]
    assert sum(sum(r.class_counts["val"]) for r in rows) == 10
    again = build_sites(job)
    assert all(torch.equal(x.train.labels, y.train.labels) for x, y in zip(sites, again))


def test_medmnist_job_with_too_many_sites_names_the_site(tmp_path):
    path = _medmnist(tmp_path, n=(40, 2, 20))
    job = _job({"source": "medmnist", "path": str(path),
                "partition": {"method": "iid", "sites": ["h1", "h2", "h3"]}})
    with pytest.raises(DataError, match="site 'h3' receives no examples in its val split"):
        build_sites(job)


def test_medmnist_job_with_a_missing_file(tmp_path):
    job = _job({"source": "medmnist", "path": str(tmp_path / "nope.npz"),
                "partition": {"method": "iid", "sites": ["h1"]}})
    with pytest.raises(DataError, match="nope.npz' not found"):
        build_sites(job)


def _site(train=None, n=4):
    ok = ArraySplit(torch.rand(n, 1, 8, 8), torch.tensor([0, 1] * (n // 2)))
    return SiteData("h1", ok if train is None else train, ok, ok)


@pytest.mark.parametrize(
    "train,expected",
    [
        (ArraySplit(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)), "no examples in its train split"),
        (ArraySplit(torch.full((2, 1, 8, 8), float("nan")), torch.tensor([0, 1])), "128 pixel value(s) are NaN"),
        (ArraySplit(torch.rand(2, 1, 9, 9), torch.tensor([0, 1])), "val split: images are (1, 8, 8), train images are (1, 9, 9)"),
        (ArraySplit(torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])), "must be float32"),
        (ArraySplit(torch.rand(2, 1, 8, 8), torch.tensor([0, 2])), "class indices in 0..1 for a binary task, found 0..2"),
        (ArraySplit(torch.rand(2, 1, 8, 8), torch.tensor([0.0, 1.0])), "must be int64 class indices"),
    ],
)
def test_bad_site_data_names_site_and_split(train, expected):
    with pytest.raises(DataError) as e:
        check_site(_site(train), BINARY)
    assert "site 'h1'" in str(e.value) and expected in str(e.value), str(e.value)


def test_multilabel_site_checks_and_counts():
    task = TaskConfig(labels="multilabel", num_classes=3)
    y = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    split = ArraySplit(torch.rand(2, 1, 8, 8), y)
    site = SiteData("m", split, split, split)
    check_site(site, task)
    assert describe_sites([site], task)[0].class_counts["test"] == [2, 1, 1]
    bad = ArraySplit(torch.rand(2, 1, 8, 8), y * 2)
    with pytest.raises(DataError, match="site 'm' train split: multi-label labels must be 0 or 1"):
        check_site(SiteData("m", bad, split, split), task)
