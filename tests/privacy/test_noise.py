"""DP noise (privacy/noise.py): a deployment draws it from a ChaCha20 keystream under fresh
OS keys (Gaussian, unpredictable); a simulation from a seeded torch generator (repeatable).
Each DP path takes the one its setting asks for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import medfed.privacy.noise as noise
from medfed.config import parse_job
from medfed.core.types import Arm, RoundPlan, TrainSettings, Update
from medfed.privacy.dp import CentralDP, LocalDP
from medfed.privacy.noise import SecureNoise, SeededNoise, noise_source, seeded_generator
from medfed.privacy.secagg.integration import SecureSum
from medfed.privacy.settings import SiteLevelDP


def test_secure_noise_is_standard_normal():
    z = SecureNoise().normal((100_000,), torch.float64)
    assert z.dtype == torch.float64 and z.shape == (100_000,)
    # 6 standard errors: a correct sampler fails these about once in 10^8 runs
    assert abs(float(z.mean())) < 6 / math.sqrt(1e5)
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / 1e5)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    # the tails are there too (about 2.7 per mille beyond 3 sigma), and even moments match
    assert 0.0020 < float((z.abs() > 3).double().mean()) < 0.0034
    assert abs(float((z**4).mean()) - 3) < 0.15


def test_two_secure_draws_differ_and_keep_shape_and_dtype():
    a, b = SecureNoise().normal((3, 5), torch.float32), SecureNoise().normal((3, 5), torch.float32)
    assert a.shape == (3, 5) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert not torch.equal(a, b)
    source = SecureNoise()
    assert not torch.equal(source.normal((1000,), torch.float64), source.normal((1000,), torch.float64))
    assert SecureNoise().normal((), torch.float64).shape == ()


def test_secure_noise_over_several_keys_and_odd_sizes(monkeypatch):
    monkeypatch.setattr(noise, "CHUNK", 1001)  # an odd chunk: each key gives an odd count
    z = SecureNoise().normal((5003,), torch.float64)
    assert torch.isfinite(z).all() and len(torch.unique(z)) == 5003
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def test_box_muller_on_the_extreme_words(monkeypatch):
    """Words of 0 give u1 = 2^-53 (never log 0) and angle 0; words of all ones give u1 = 1."""
    top = np.uint64(2**64 - 1)
    monkeypatch.setattr(noise, "_keystream_words", lambda n: np.array([0, top, 0, top][:n], dtype=np.uint64))
    z = noise._gaussian_chunk(4)  # pairs (u1 word, angle word): (0, 0) and (top, top)
    assert z[0] == pytest.approx(math.sqrt(106 * math.log(2))) and z[2] == 0  # r cos 0, r sin 0
    assert z[1] == 0 and z[3] == 0  # u1 = 1: r = 0


def test_the_keystream_is_chacha20_under_a_fresh_key_each_time():
    a, b = noise._keystream_words(4), noise._keystream_words(4)
    assert a.dtype == np.dtype("<u8") and len(a) == 4 and not np.array_equal(a, b)


def test_a_simulation_repeats_its_noise():
    a = noise_source(7, 1).normal((10,), torch.float32)
    assert torch.equal(a, noise_source(7, 1).normal((10,), torch.float32))
    assert not torch.equal(a, noise_source(7, 2).normal((10,), torch.float32))
    g = seeded_generator(7, 1)
    assert torch.equal(a, torch.randn(10, generator=g))  # what it was before noise.py: runs repeat
    assert isinstance(noise_source(None), SecureNoise)


# --- each DP path takes the generator its setting asks for -----------------------------------


def _forbid(monkeypatch, cls):
    def refuse(self, shape, dtype):
        raise AssertionError(f"{cls.__name__} used")

    monkeypatch.setattr(cls, "normal", refuse)


def _update(site="a"):
    return Update(site, 1, {"w": torch.full((50,), 0.5)}, num_examples=10, num_steps=1)


GLOBAL = {"w": torch.zeros(50)}


def _plan():
    train = TrainSettings(local_epochs=1, batch_size=4, lr=0.1, optimizer="sgd", momentum=0.0, weight_decay=0.0, seed=3)
    return RoundPlan(job_id="j", round=1, arm=Arm.FEDERATED, train=train)


def test_deployed_local_and_central_noise_come_from_the_secure_generator(monkeypatch):
    _forbid(monkeypatch, SeededNoise)
    out = LocalDP(clip=1.0, noise_multiplier=1.0, secure=True).apply(_update(), GLOBAL, _plan())
    assert not torch.equal(out.params["w"], _update().params["w"])
    CentralDP(clip=1.0, noise_multiplier=1.0, seed=None).combine(GLOBAL, [_update("a"), _update("b")], 1)
    job = parse_job({"name": "t", "output": "o", "rounds": 1, "model": {"name": "small_cnn"},
                     "task": {"labels": "binary"}, "privacy": {"secure_aggregation": {}},
                     "data": {"source": "synthetic", "sites": [{"name": s, "n_train": 4, "n_test": 2} for s in "ab"]}})
    central = SiteLevelDP(noise="central", noise_multiplier=1.0, clip=1.0, delta=1e-5)
    assert SecureSum(job, None, {"a": 1, "b": 1}, central, noise_seed=None)._noise(100, 2, 1).shape == (100,)


def test_simulated_noise_comes_from_the_seeded_generator(monkeypatch):
    _forbid(monkeypatch, SecureNoise)
    a = LocalDP(clip=1.0, noise_multiplier=1.0, secure=False).apply(_update(), GLOBAL, _plan())
    b = LocalDP(clip=1.0, noise_multiplier=1.0, secure=False).apply(_update(), GLOBAL, _plan())
    assert torch.equal(a.params["w"], b.params["w"])
    CentralDP(clip=1.0, noise_multiplier=1.0, seed=0).combine(GLOBAL, [_update("a"), _update("b")], 1)
