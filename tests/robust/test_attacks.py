import dataclasses
import math

import numpy as np
import pytest
import torch

from medfed.core.types import Arm, Encoding, RoundPlan, TrainSettings, Update
from medfed.robust.attacks import PoisonFilter, choose_attackers, flip_labels

SITES = [f"hospital_{c}" for c in "abcdefghij"]


def _plan(seed=0):
    return RoundPlan("job", 1, Arm.FEDERATED, TrainSettings(1, 8, 0.1, "sgd", 0.0, 0.0, seed))


# ---------------------------------------------------------------- choose_attackers


def test_a_fifth_of_ten_sites_is_two_in_job_order():
    picked = choose_attackers(SITES, 0.2, seed=3)
    assert len(picked) == 2
    assert picked == [s for s in SITES if s in picked]


def test_the_draw_is_the_documented_seeded_permutation():
    perm = np.random.default_rng(np.random.SeedSequence([5, 0xA77AC])).permutation(10)
    assert choose_attackers(SITES, 0.3, seed=5) == [SITES[i] for i in sorted(perm[:3])]


def test_no_fraction_means_no_attackers():
    assert choose_attackers(SITES, 0.0, seed=1) == []
    assert choose_attackers([], 0.5, seed=1) == []


@pytest.mark.parametrize(("fraction", "k"), [(0.05, 1), (0.04, 0), (0.25, 3), (0.99, 10)])
def test_the_count_rounds_half_up(fraction, k):
    assert len(choose_attackers(SITES, fraction, seed=0)) == k


def test_same_seed_same_attackers_and_seeds_matter():
    assert choose_attackers(SITES, 0.3, seed=11) == choose_attackers(SITES, 0.3, seed=11)
    draws = {tuple(choose_attackers(SITES, 0.3, seed=s)) for s in range(10)}
    assert len(draws) > 1


@pytest.mark.parametrize("fraction", [1.0, -0.1, math.nan, True])
def test_a_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction must be in"):
        choose_attackers(SITES, fraction, seed=0)


def test_a_negative_seed_is_refused():
    with pytest.raises(ValueError, match="seed must be"):
        choose_attackers(SITES, 0.2, seed=-1)


# ---------------------------------------------------------------- flip_labels


def test_binary_labels_swap():
    out = flip_labels(torch.tensor([0, 1, 1]), "binary", 2)
    assert out.dtype == torch.int64 and torch.equal(out, torch.tensor([1, 0, 0]))


def test_multiclass_labels_mirror():
    out = flip_labels(torch.tensor([0, 3, 1, 2]), "multiclass", 4)
    assert out.dtype == torch.int64 and torch.equal(out, torch.tensor([3, 0, 2, 1]))


def test_multilabel_flips_every_label():
    labels = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    out = flip_labels(labels, "multilabel", 2)
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))


def test_flipping_leaves_the_input_alone():
    labels = torch.tensor([0, 1])
    flip_labels(labels, "binary", 2)
    assert torch.equal(labels, torch.tensor([0, 1]))


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="labels_kind"):
        flip_labels(torch.tensor([0]), "segmentation", 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        flip_labels(torch.tensor([0, 3]), "multiclass", 3)
    with pytest.raises(ValueError, match="0 or 1"):
        flip_labels(torch.tensor([0, 2]), "binary", 2)


# ---------------------------------------------------------------- PoisonFilter

GLOBAL = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(5)}


def _update(params=None, encoding=Encoding.FULL):
    params = params or {"w": torch.tensor([2.0, 0.0]), "bn.num_batches_tracked": torch.tensor(7)}
    return Update("hospital_a", 1, params, num_examples=30, num_steps=4, metrics={"loss": 0.5}, encoding=encoding)


def test_sign_flip_reverses_and_scales_the_delta():
    # delta (1, -2) -> -2 * delta = (-2, 4) -> global + that = (-1, 6)
    out = PoisonFilter("sign_flip", 2.0).apply(_update(), GLOBAL, _plan())
    assert torch.equal(out.params["w"], torch.tensor([-1.0, 6.0]))
    assert out.params["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out.params["bn.num_batches_tracked"]) == 7
    assert list(out.params) == ["w", "bn.num_batches_tracked"]
    assert dataclasses.replace(out, params={}) == dataclasses.replace(_update(), params={})


def test_scale_boosts_the_delta():
    # delta (1, -2) * 10 = (10, -20) -> (11, -18)
    out = PoisonFilter("scale", 10.0).apply(_update(), GLOBAL, _plan())
    assert torch.equal(out.params["w"], torch.tensor([11.0, -18.0]))


def test_noise_replaces_the_delta_with_seeded_gaussian_noise():
    glob = {"w": torch.full((100, 100), 3.0)}
    update = _update({"w": torch.full((100, 100), 1e3)})
    out = PoisonFilter("noise", 0.5).apply(update, glob, _plan(seed=1))
    d = out.params["w"] - glob["w"]
    assert abs(float(d.mean())) < 0.02 and abs(float(d.std()) - 0.5) < 0.02


def test_noise_is_deterministic_per_seed():
    glob = {"w": torch.zeros(50)}
    poison = PoisonFilter("noise", 1.0)
    a = poison.apply(_update({"w": torch.ones(50)}), glob, _plan(seed=4)).params["w"]
    b = poison.apply(_update({"w": torch.full((50,), 7.0)}), glob, _plan(seed=4)).params["w"]
    c = poison.apply(_update({"w": torch.ones(50)}), glob, _plan(seed=5)).params["w"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_encoded_updates_are_refused():
    with pytest.raises(ValueError, match="encoding 'int8'"):
        PoisonFilter("scale", 2.0).apply(_update(encoding=Encoding.INT8), GLOBAL, _plan())


@pytest.mark.parametrize(("kind", "scale", "match"), [("flip", 1.0, "kind"), ("scale", 0.0, "scale"),
                                                      ("noise", -1.0, "scale"), ("scale", math.inf, "scale")])
def test_bad_poison_settings_are_refused(kind, scale, match):
    with pytest.raises(ValueError, match=match):
        PoisonFilter(kind, scale)
