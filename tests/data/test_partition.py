import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.config import PartitionConfig, TaskConfig
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit
from medfed.data.partition import (
    class_counts, cut, dirichlet_proportions, iid, partition_class, partition_splits, quantity,
    quantity_proportions, split_by_proportions,
)

SPLITS = ("train", "val", "test")
BINARY = TaskConfig(labels="binary")


def _assert_covers_once(parts, n, n_sites):
    assert len(parts) == n_sites
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


SIZES = dict(n=st.integers(0, 300), sites=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(**SIZES)
def test_iid_covers_every_index_once_with_equal_sizes(n, sites, seed):
    parts = iid(n, sites, np.random.default_rng(seed))
    _assert_covers_once(parts, n, sites)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(**SIZES, k=st.integers(1, 6), alpha=st.floats(1e-3, 1e3))
def test_dirichlet_covers_every_index_once(n, sites, seed, k, alpha):
    rng = np.random.default_rng(seed)
    props = dirichlet_proportions(k, sites, alpha, rng)
    assert props.shape == (k, sites) and np.allclose(props.sum(1), 1.0)
    _assert_covers_once(split_by_proportions(rng.integers(0, k, n), props, rng), n, sites)


@settings(max_examples=60, deadline=None)
@given(**SIZES, alpha=st.floats(1e-3, 1e3))
def test_quantity_covers_every_index_once(n, sites, seed, alpha):
    rng = np.random.default_rng(seed)
    shares = quantity_proportions(sites, alpha, rng)
    assert shares.shape == (sites,) and np.isclose(shares.sum(), 1.0)
    _assert_covers_once(quantity(n, shares, rng), n, sites)


def test_iid_sizes_hand_computed():
    assert sorted(len(p) for p in iid(103, 4, np.random.default_rng(0))) == [25, 26, 26, 26]


def test_cut_hand_computed():
    pieces = cut(np.arange(10), np.array([0.2, 0.3, 0.5]))
    assert [p.tolist() for p in pieces] == [[0, 1], [2, 3, 4], [5, 6, 7, 8, 9]]


def test_split_by_proportions_hand_computed():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    a, b = split_by_proportions(labels, np.array([[0.5, 0.5], [1.0, 0.0]]), np.random.default_rng(0))
    assert np.bincount(labels[a], minlength=2).tolist() == [2, 3]
    assert np.bincount(labels[b], minlength=2).tolist() == [2, 0]
    assert set(a.tolist()) >= {4, 5, 6}


def test_split_by_proportions_refuses_unknown_classes():
    with pytest.raises(DataError, match=r"must be in 0\.\.1, found 0\.\.2"):
        split_by_proportions(np.array([0, 2]), np.full((2, 2), 0.5), np.random.default_rng(0))


def test_alpha_controls_skew():
    rng = np.random.default_rng(0)
    skewed = dirichlet_proportions(10, 5, 0.01, rng)
    flat = dirichlet_proportions(10, 5, 1e4, rng)
    assert skewed.max(1).mean() > 0.9  # each class goes almost entirely to one site
    assert np.abs(flat - 0.2).max() < 0.02
    assert quantity_proportions(5, 0.01, rng).max() > 0.9
    assert np.abs(quantity_proportions(5, 1e4, rng) - 0.2).max() < 0.02


def test_partition_class_of_multilabel_is_first_positive_or_none():
    y = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    cls, k = partition_class(y, TaskConfig(labels="multilabel", num_classes=3))
    assert cls.tolist() == [1, 0, 3] and k == 4


def test_class_counts():
    assert class_counts(torch.tensor([0, 2, 2, 1, 2]), TaskConfig(labels="multiclass", num_classes=4)) == [1, 1, 3, 0]
    assert class_counts(torch.tensor([1, 1]), BINARY) == [0, 2]
    ml = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert class_counts(ml, TaskConfig(labels="multilabel", num_classes=2)) == [2, 1]


def _splits(n=200, k=2, seed=0, multilabel=False):
    g = torch.Generator().manual_seed(seed)

    def labels():
        if multilabel:
            return torch.randint(0, 2, (n, k), generator=g).float()
        return torch.randint(0, k, (n,), generator=g)

    return {s: ArraySplit(torch.rand(n, 1, 4, 4, generator=g), labels()) for s in SPLITS}


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_partition_splits_covers_each_split_and_is_seeded(method):
    splits = _splits()
    cfg = PartitionConfig(method=method, sites=["a", "b", "c"], alpha=5.0)
    sites = partition_splits(splits, cfg, BINARY, seed=1)
    assert [s.name for s in sites] == ["a", "b", "c"]
    for name in SPLITS:
        images = torch.cat([s.split(name).images for s in sites])
        assert len(images) == 200
        assert torch.equal(images.flatten(1).sum(1).sort().values, splits[name].images.flatten(1).sum(1).sort().values)
    again = partition_splits(splits, cfg, BINARY, seed=1)
    other = partition_splits(splits, cfg, BINARY, seed=2)
    assert all(torch.equal(x.train.images, y.train.images) for x, y in zip(sites, again))
    assert not all(torch.equal(x.train.images, y.train.images) for x, y in zip(sites, other))


def test_dirichlet_keeps_site_population_across_splits():
    splits = _splits(n=3000, k=4)
    cfg = PartitionConfig(method="dirichlet", sites=["a", "b"], alpha=0.3)
    task = TaskConfig(labels="multiclass", num_classes=4)
    for s in partition_splits(splits, cfg, task, seed=3):
        tr = np.array(class_counts(s.train.labels, task)) / len(s.train)
        te = np.array(class_counts(s.test.labels, task)) / len(s.test)
        assert np.abs(tr - te).max() < 0.05


def test_quantity_keeps_site_share_across_splits():
    splits = _splits(n=1000)
    sites = partition_splits(splits, PartitionConfig(method="quantity", sites=["a", "b", "c"], alpha=1.0), BINARY, 4)
    shares = {name: np.array([len(s.split(name)) for s in sites]) / 1000 for name in SPLITS}
    assert np.abs(shares["train"] - shares["test"]).max() < 0.002


def test_multilabel_partition():
    task = TaskConfig(labels="multilabel", num_classes=3)
    sites = partition_splits(_splits(k=3, multilabel=True), PartitionConfig(method="dirichlet", sites=["a", "b"]),
                             task, seed=0)
    assert sum(len(s.test) for s in sites) == 200 and sites[0].train.labels.shape[1] == 3


def test_empty_site_names_site_split_and_remedy():
    cfg = PartitionConfig(method="quantity", sites=[f"s{i}" for i in range(12)], alpha=0.05)
    with pytest.raises(DataError, match=r"site 's\d+' receives no examples in its train split.*larger alpha"):
        partition_splits(_splits(n=6), cfg, BINARY, seed=0)


def test_too_many_sites_for_iid_suggests_fewer_sites():
    cfg = PartitionConfig(method="iid", sites=["a", "b", "c"])
    with pytest.raises(DataError, match=r"site 'c' receives no examples in its train split.*use fewer sites$"):
        partition_splits(_splits(n=2), cfg, BINARY, seed=0)
