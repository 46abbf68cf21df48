"""FedDG's frequency-space interpolation: the band amplitudes a site shares, the mixing
that keeps each image's phase, the checks on a received bank, the job's refusals, and a
run whose federated arm trains on mixed images while its local arm is untouched."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import medfed
from medfed.config import parse_job
from medfed.core.errors import ConfigError, DataError
from medfed.data.frequency import AmplitudeMix, band_half, check_bank, low_amplitudes


def _images(n=4, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_band_is_central_and_its_amplitude_only():
    x = _images()
    amp = low_amplitudes(x, 0.25)
    b = band_half((16, 16), 0.25)
    assert b == 2 and amp.shape == (4, 1, 5, 5) and bool((amp >= 0).all())
    full = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)).abs()
    assert torch.allclose(amp, full[..., 6:11, 6:11])  # the centre (index 8) +- 2


def test_mixing_with_ones_own_amplitude_changes_nothing_and_keeps_the_phase():
    x = _images(1)
    same = AmplitudeMix(low_amplitudes(x, 0.25), 0.25, probability=1.0, strength=1.0)
    out, _ = same(x, torch.zeros(1), seed=3)
    assert torch.allclose(out, x, atol=1e-5)
    other = AmplitudeMix(low_amplitudes(_images(1, seed=9) * 5, 0.25), 0.25, probability=1.0, strength=1.0)
    y, labels = other(x, torch.ones(1), seed=3)
    assert not torch.allclose(y, x, atol=1e-3) and torch.equal(labels, torch.ones(1))
    spec = lambda t: torch.fft.fftshift(torch.fft.fft2(t), dim=(-2, -1))[..., 6:11, 6:11]  # noqa: E731
    keep = spec(x).abs() > 1e-3  # where the phase is defined
    assert torch.allclose(torch.angle(spec(y))[keep], torch.angle(spec(x))[keep], atol=1e-3)
    again, _ = other(x, torch.ones(1), seed=3)
    assert torch.equal(again, y)  # seeded
    never = AmplitudeMix(low_amplitudes(_images(1, seed=9), 0.25), 0.25, probability=0.0, strength=1.0)
    assert torch.equal(never(x, torch.ones(1), seed=3)[0], x)


@pytest.mark.parametrize("bank,expected", [
    ([[[[1.0]]]], "expected (N <= 4, 1, 5, 5)"),
    (torch.full((5, 1, 5, 5), 1.0).tolist(), "expected (N <= 4"),
    (torch.full((2, 1, 5, 5), -1.0).tolist(), "must be finite and >= 0"),
    (torch.full((2, 1, 5, 5), float("nan")).tolist(), "must be finite and >= 0"),
    ("not numbers", "not an array of numbers"),
])
def test_a_received_bank_is_checked(bank, expected):
    with pytest.raises(DataError) as e:
        check_bank(bank, 1, 2, 4)
    assert expected in str(e.value)


BASE = {"name": "dg", "seed": 2, "output": "out", "rounds": 2, "threads": 1, "device": "cpu",
        "data": {"source": "synthetic", "image_size": 16, "sites": [
            {"name": f"s{i}", "n_train": 24, "n_val": 8, "n_test": 8, "prevalence": 0.5,
             "scanner": {"intensity_scale": 0.6 + 0.5 * i, "intensity_offset": 0.1 * i}} for i in range(3)]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
        "train": {"batch_size": 8, "lr": 0.05}}
FEDDG = {"method": "feddg", "share_amplitudes": True, "ratio": 0.25, "bank_per_site": 4, "probability": 1.0}


@pytest.mark.parametrize("extra,expected", [
    ({"generalization": {"method": "feddg"}}, "generalization: share_amplitudes: feddg sends the amplitude spectra"),
    ({"generalization": FEDDG, "privacy": {"secure_aggregation": {}}}, "outside what privacy.secure_aggregation covers"),
    ({"generalization": FEDDG, "privacy": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                                      "delta": 1e-5}}}, "outside what privacy.dp covers"),
])
def test_what_feddg_cannot_go_with_is_refused(extra, expected):
    with pytest.raises(ConfigError) as e:
        parse_job({**copy.deepcopy(BASE), **extra})
    assert expected in str(e.value)


def test_feddg_changes_federated_training_and_leaves_the_local_arm_alone(tmp_path, caplog):
    plain = {**copy.deepcopy(BASE), "output": str(tmp_path / "plain"), "compare": ["local"]}
    with caplog.at_level(logging.INFO, logger="medfed"):
        mixed = medfed.run({**plain, "output": str(tmp_path / "mixed"), "generalization": FEDDG}, progress=False)
    base = medfed.run(plain, progress=False)
    assert "feddg: 12 amplitude spectra of 3 site(s), a 5x5 band per channel" in caplog.text

    def values(result, arm):
        return [(r["round"], r["site"], r["split"], r["metric"], r["value"]) for r in result.metrics
                if r["arm"] == arm and r["metric"] in ("auc", "loss")]

    assert values(mixed, "local") == values(base, "local")  # only the federated arm mixes
    assert values(mixed, "federated") != values(base, "federated")
    assert parse_job({**plain, "generalization": FEDDG}).job_hash() != parse_job(plain).job_hash()
