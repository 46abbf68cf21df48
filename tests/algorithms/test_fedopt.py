import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms.fedavg import weighted_average
from medfed.algorithms.fedopt import FedOpt
from medfed.core.types import Update

TRAIN = frozenset({"w"})


def _up(site, w, n, buf=0.0):
    return Update(site, 1, {"w": torch.tensor(w, dtype=torch.float32), "bn.running_mean": torch.tensor([buf])}, n, 1)


def _opt(name, **kw):
    args = dict(server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    args.update(kw)
    return FedOpt(name, trainable=TRAIN, **args)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=4),
       sizes=st.lists(st.integers(1, 1000), min_size=2, max_size=4))
def test_fedavgm_without_momentum_is_fedavg(values, sizes):
    ups = [_up(f"s{i}", [v], n) for i, (v, n) in enumerate(zip(values, sizes))]
    g = {"w": torch.tensor([0.5]), "bn.running_mean": torch.tensor([0.0])}
    got = _opt("fedavgm", beta1=0.0).aggregate(g, ups)
    want = weighted_average([u.params for u in ups], [u.num_examples for u in ups])
    assert torch.allclose(got["w"], want["w"], atol=1e-4)


def test_fedavgm_momentum_two_rounds_hand_computed():
    opt = _opt("fedavgm", beta1=0.5, server_lr=1.0)
    x = {"w": torch.tensor([0.0]), "bn.running_mean": torch.tensor([0.0])}
    x = opt.aggregate(x, [_up("a", [1.0], 1)])  # delta 1, v = 1, x = 1
    assert float(x["w"]) == pytest.approx(1.0)
    x = opt.aggregate(x, [_up("a", [2.0], 1)])  # delta 1, v = 0.5 + 1, x = 2.5
    assert float(x["w"]) == pytest.approx(2.5)


def test_fedadam_one_step_hand_computed():
    opt = _opt("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = {"w": torch.tensor([0.0]), "bn.running_mean": torch.tensor([4.0])}
    out = opt.aggregate(x, [_up("a", [1.0], 1, buf=2.0), _up("b", [3.0], 3, buf=6.0)])
    delta = (1 * 1 + 3 * 3) / 4  # 2.5
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    assert float(out["w"]) == pytest.approx(0.1 * m / (math.sqrt(v) + 1e-3), rel=1e-5)
    assert float(out["bn.running_mean"]) == pytest.approx(5.0)  # buffers: plain weighted mean


def test_fedyogi_and_fedadagrad_second_moment_hand_computed():
    x = {"w": torch.tensor([0.0]), "bn.running_mean": torch.tensor([0.0])}
    ups = [_up("a", [2.0], 1)]  # delta = 2, d2 = 4
    yogi = _opt("fedyogi", server_lr=1.0, beta1=0.0, beta2=0.5, tau=0.1)
    yogi.aggregate(x, ups)
    # v0 = tau^2 = 0.01; v0 - d2 < 0 so sign = -1: v = 0.01 + 0.5 * 4
    assert float(yogi.v["w"]) == pytest.approx(2.01)
    ada = _opt("fedadagrad", server_lr=1.0, beta1=0.0, tau=0.1)
    out = ada.aggregate(x, ups)
    assert float(ada.v["w"]) == pytest.approx(4.01)
    assert float(out["w"]) == pytest.approx(2.0 / (math.sqrt(4.01) + 0.1), rel=1e-5)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError):
        FedOpt("fedsgdx", 1.0, 0.9, 0.99, 1e-3)
