import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.config import PartitionConfig, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit
from medfed.data.partition import (
    class_counts, dirichlet_proportions, iid, partition_splits, quantity_proportions, split_by_proportions,
)


def _covers_once(parts, n):
    allidx = np.concatenate(parts) if parts else np.zeros(0)
    return len(allidx) == n and len(np.unique(allidx)) == n and all(np.all(np.diff(p) > 0) for p in parts)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 300), sites=st.integers(1, 12), k=st.integers(2, 6),
       alpha=st.floats(0.01, 100), seed=st.integers(0, 2**31 - 1))
def test_every_partition_covers_every_index_exactly_once(n, sites, k, alpha, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    assert _covers_once(iid(n, sites, rng), n)
    assert _covers_once(split_by_proportions(labels, dirichlet_proportions(k, sites, alpha, rng), rng), n)
    shares = quantity_proportions(sites, alpha, rng)
    assert np.isclose(shares.sum(), 1.0)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid(103, 4, np.random.default_rng(0))]
    assert sorted(sizes) == [25, 26, 26, 26]


def test_split_by_proportions_hand_computed():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    props = np.array([[0.5, 0.5], [1.0, 0.0]])
    a, b = split_by_proportions(labels, props, np.random.default_rng(0))
    assert sorted(labels[a].tolist()) == [0, 0, 1, 1, 1] and sorted(labels[b].tolist()) == [0, 0]


def test_dirichlet_alpha_controls_skew():
    rng = np.random.default_rng(0)
    skewed = dirichlet_proportions(10, 5, 0.05, rng)
    flat = dirichlet_proportions(10, 5, 1000.0, rng)
    assert skewed.max(1).mean() > 0.8
    assert np.abs(flat - 0.2).max() < 0.05


def _splits(n=200, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: ArraySplit(torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, k, (n,), generator=g))
            for s in ("train", "val", "test")}


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partition_splits_covers_each_split(method):
    splits = _splits()
    cfg = PartitionConfig(method=method, sites=["a", "b", "c"], alpha=5.0)
    sites = partition_splits(splits, cfg, TaskConfig(labels="binary"), seed=1)
    assert [s.name for s in sites] == ["a", "b", "c"]
    for name in ("train", "val", "test"):
        assert sum(len(s.split(name)) for s in sites) == 200


def test_dirichlet_keeps_site_population_across_splits():
    splits = _splits(n=3000, k=4)
    cfg = PartitionConfig(method="dirichlet", sites=["a", "b"], alpha=0.3)
    task = TaskConfig(labels="multiclass", num_classes=4)
    for s in partition_splits(splits, cfg, task, seed=3):
        tr = np.array(class_counts(s.train.labels, task)) / len(s.train)
        te = np.array(class_counts(s.test.labels, task)) / len(s.test)
        assert np.abs(tr - te).max() < 0.1


def test_empty_site_is_an_error_naming_it():
    splits = _splits(n=6)
    cfg = PartitionConfig(method="quantity", sites=[f"s{i}" for i in range(12)], alpha=0.05)
    with pytest.raises(DataError, match="receives no examples"):
        partition_splits(splits, cfg, TaskConfig(labels="binary"), seed=0)


def test_class_counts():
    assert class_counts(torch.tensor([0, 2, 2, 1, 2]), TaskConfig(labels="multiclass", num_classes=4)) == [1, 1, 3, 0]
    ml = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert class_counts(ml, TaskConfig(labels="multilabel", num_classes=2)) == [2, 1]
