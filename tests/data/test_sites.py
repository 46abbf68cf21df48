import pytest
import torch

from medfed.config import TaskConfig, parse_job
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit, SiteData
from medfed.data.sites import build_sites, check_site, describe_sites

BINARY = TaskConfig(labels="binary")


def _site(train=None, n=4):
    ok = ArraySplit(torch.rand(n, 1, 8, 8), torch.tensor([0, 1] * (n // 2)))
    return SiteData("h1", ok if train is None else train, ok, ok)


def test_synthetic_job_builds_and_describes():
    job = parse_job({
        "name": "t", "output": "o", "rounds": 1, "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
        "data": {"source": "synthetic", "image_size": 16,
                 "sites": [{"name": "a", "n_train": 10, "n_val": 4, "n_test": 4, "prevalence": 0.5}]},
    })
    (site,) = build_sites(job)
    (row,) = describe_sites([site], job.task)
    assert row == {"name": "a", "train": 10, "val": 4, "test": 4,
                   "class_counts": {"train": [5, 5], "val": [2, 2], "test": [2, 2]}}


def test_synthetic_data_refuses_a_multiclass_task():
    job = parse_job({
        "name": "t", "output": "o", "rounds": 1, "model": {"name": "small_cnn"},
        "task": {"labels": "multiclass", "num_classes": 3},
        "data": {"source": "synthetic", "sites": [{"name": "a", "n_train": 10, "n_test": 4}]},
    })
    with pytest.raises(DataError, match="synthetic data is binary"):
        build_sites(job)


@pytest.mark.parametrize(
    "train,expected",
    [
        (ArraySplit(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)), "no examples in its train split"),
        (ArraySplit(torch.full((2, 1, 8, 8), float("nan")), torch.tensor([0, 1])), "128 pixel value(s) are NaN"),
        (ArraySplit(torch.rand(2, 1, 9, 9), torch.tensor([0, 1])), "val split: images are (1, 8, 8), train images are (1, 9, 9)"),
        (ArraySplit(torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])), "must be float32"),
        (ArraySplit(torch.rand(2, 1, 8, 8), torch.tensor([0, 2])), "class indices in 0..1"),
    ],
)
def test_bad_site_data_names_site_and_split(train, expected):
    with pytest.raises(DataError) as e:
        check_site(_site(train), BINARY)
    assert "site 'h1'" in str(e.value) and expected in str(e.value)
