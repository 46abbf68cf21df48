"""The job's privacy, compression, robust and attack sections: every bad value or
combination is an error naming the field."""

import copy

import pytest

from medfed.config import parse_job
from medfed.core.errors import ConfigError

SITES = [{"name": n, "n_train": 20, "n_test": 5} for n in ("a", "b", "c", "d", "e")]
BASE = {
    "name": "t",
    "output": "out",
    "rounds": 2,
    "data": {"source": "synthetic", "sites": SITES},
    "model": {"name": "small_cnn", "norm": "group"},
    "task": {"labels": "binary"},
}
DP = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
SGD = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


def _job(**over):
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(over))
    return parse_job(raw, "job.yaml")


def _error(**over) -> str:
    with pytest.raises(ConfigError) as e:
        _job(**over)
    return str(e.value)


@pytest.mark.parametrize(
    "over,expected",
    [
        ({"privacy": {"dp": {**DP, "noise_multiplier": 0}}}, "privacy.dp.noise_multiplier: must be > 0, got 0"),
        ({"privacy": {"dp": {**DP, "noise_multiplier": -1}}}, "privacy.dp.noise_multiplier: must be > 0"),
        ({"privacy": {"dp": {**DP, "delta": 1}}}, "privacy.dp.delta: must be < 1, got 1"),
        ({"privacy": {"dp": {**DP, "delta": 0}}}, "privacy.dp.delta: must be > 0"),
        ({"privacy": {"dp": {**DP, "clip": 0}}}, "privacy.dp.clip: must be > 0, got 0"),
        ({"privacy": {"dp": {**DP, "max_epsilon": 0}}}, "privacy.dp.max_epsilon: must be > 0"),
        ({"privacy": {"dp": {"clip": 1.0, "delta": 1e-5}}}, "privacy.dp.noise_multiplier: is required"),
        ({"privacy": {"dp": {**DP, "noise": "somewhere"}}}, "privacy.dp.noise"),
        ({"privacy": {"dp": {**DP, "adaptive": {"count_noise_multiplier": 0.4}}}},
         "adaptive.count_noise_multiplier: must be > noise_multiplier / 2"),
        ({"privacy": {"dp": {**DP, "noise": "local", "adaptive": {"count_noise_multiplier": 5}}}},
         "adaptive clipping needs noise: central"),
        ({"privacy": {"dp_sgd": {**SGD, "max_grad_norm": 0}}}, "privacy.dp_sgd.max_grad_norm: must be > 0"),
        ({"privacy": {"dp_sgd": {**SGD, "delta": 1.5}}}, "privacy.dp_sgd.delta: must be < 1"),
        ({"privacy": {"dp": DP, "dp_sgd": SGD}}, "give dp (site-level) or dp_sgd (sample-level), not both"),
        ({"privacy": {"dp": DP}, "algorithm": {"name": "scaffold"}, "train": {"momentum": 0}},
         "algorithm.name: site-level DP bounds each site's share"),
        ({"privacy": {"dp": DP}, "algorithm": {"name": "fednova"}}, "'fednova' rescales each site's update"),
        ({"privacy": {"dp": DP}, "algorithm": {"name": "feddyn"}}, "privacy cost is not accounted for"),
        ({"privacy": {"dp": DP}, "sampling": {"count": 2, "method": "size"}}, "sampling.method: DP accounting"),
        ({"privacy": {"dp": DP}, "robust": {"rule": "median"}}, "robust: central DP noise and a robust rule"),
        ({"privacy": {"dp_sgd": SGD}, "model": {"name": "small_cnn", "norm": "group"}, "algorithm": {"name": "fedprox"}},
         "algorithm.name: 'fedprox' adds a proximal loss term outside the per-example gradients"),
        ({"privacy": {"dp_sgd": SGD}, "model": {"name": "small_cnn"}}, "model.norm: DP-SGD needs per-example gradients"),
        ({"privacy": {"dp": DP}, "model": {"name": "small_cnn"}}, "model.norm: site-level DP adds noise to every entry"),
        ({"privacy": {"dp": {**DP, "noise": "local"}}, "model": {"name": "resnet18"}}, "got resnet18 with batch norm"),
        ({"privacy": {"dp_sgd": SGD}, "model": {"name": "densenet121", "norm": "group"}}, "model.norm"),
        ({"privacy": {"secure_aggregation": {"threshold": 6}}}, "privacy.secure_aggregation.threshold: is 6 but only 5"),
        ({"privacy": {"secure_aggregation": {"threshold": 1}}}, "privacy.secure_aggregation.threshold: must be >= 2"),
        ({"privacy": {"secure_aggregation": {"clip_range": 0}}}, "privacy.secure_aggregation.clip_range: must be > 0"),
        ({"privacy": {"secure_aggregation": {}}, "min_sites": 2}, "min_sites: is 2 but secure aggregation needs"),
        ({"privacy": {"secure_aggregation": {}}, "robust": {"rule": "median"}}, "robust: a robust rule needs each site's"),
        ({"privacy": {"secure_aggregation": {}}, "compression": {"method": "fp16"}}, "compression: secure aggregation"),
        ({"privacy": {"secure_aggregation": {}}, "sampling": {"count": 1}}, "needs at least 2 sites per round"),
        ({"privacy": {"secure_aggregation": {}, "dp": {**DP, "adaptive": {"count_noise_multiplier": 5}}}},
         "privacy.dp.adaptive: adaptive clipping needs each site's norm"),
        ({"privacy": {"secure_aggregation": {}}, "algorithm": {"name": "fednova"}}, "secure aggregation reveals only the sum"),
        ({"compression": {"method": "topk"}}, "compression.fraction: topk needs the fraction"),
        ({"compression": {"method": "int8", "fraction": 0.1}}, "compression.fraction: only topk keeps a fraction"),
        ({"compression": {"method": "topk", "fraction": 0}}, "compression.fraction: must be > 0"),
        ({"compression": {"method": "zip"}}, "compression.method"),
        ({"robust": {"rule": "trimmed_mean"}}, "robust.trim: trimmed_mean needs it"),
        ({"robust": {"rule": "median", "trim": 0.1}}, "robust.trim: median does not use it"),
        ({"robust": {"rule": "trimmed_mean", "trim": 0.5}}, "robust.trim: must be < 0.5"),
        ({"robust": {"rule": "krum", "f": 2}}, "robust.f: krum with f=2 needs at least 7 sites per round"),
        ({"robust": {"rule": "multi_krum", "f": 1, "select": 6}}, "robust.select: is 6 but only 5 sites"),
        ({"robust": {"rule": "norm_bound", "max_norm": -1}}, "robust.max_norm: must be > 0"),
        ({"robust": {"rule": "median"}, "algorithm": {"name": "fednova"}}, "robust: replaces the weighted mean"),
        ({"attack": {"kind": "sign_flip", "fraction": 1.0}}, "attack.fraction: must be < 1"),
        ({"attack": {"kind": "scale", "fraction": 0.2, "scale": 0}}, "attack.scale: must be > 0"),
    ],
)
def test_bad_settings_name_the_field(over, expected):
    assert expected in _error(**over)


def test_valid_settings_load():
    job = _job(privacy={"dp": {**DP, "adaptive": {"count_noise_multiplier": 5}}}, compression={"method": "int8"})
    assert job.privacy.dp.adaptive.target_quantile == 0.5
    job = _job(privacy={"secure_aggregation": {}, "dp": DP})
    assert job.secagg_threshold == 3  # a majority of the 5 sites of a round
    job = _job(privacy={"dp_sgd": SGD}, model={"name": "small_cnn", "norm": "group"}, algorithm={"name": "fedavgm"})
    assert job.privacy.dp_sgd.noise_multiplier == 1.0
    job = _job(robust={"rule": "krum", "f": 1}, attack={"kind": "sign_flip", "fraction": 0.2})
    assert job.robust.f == 1 and job.attack.scale == 1.0
    job = _job(privacy={"dp": DP}, model={"name": "small_cnn"}, algorithm={"name": "fedbn"})  # BN stays at the sites
    assert job.has_batch_norm


def test_label_flip_needs_classification():
    over = {
        "data": {"source": "synthetic_segmentation", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]},
        "model": {"name": "unet"},
        "task": {"kind": "segmentation", "num_classes": 2},
        "attack": {"kind": "label_flip", "fraction": 0.5},
    }
    assert "attack.kind: label_flip is for classification" in _error(**over)


def test_dp_sgd_is_refused_for_segmentation():
    over = {
        "data": {"source": "synthetic_segmentation", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]},
        "model": {"name": "unet", "norm": "group"},
        "task": {"kind": "segmentation", "num_classes": 2},
        "privacy": {"dp_sgd": SGD},
    }
    assert "task.kind: DP-SGD bounds each example's gradient" in _error(**over)
