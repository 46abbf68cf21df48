import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms.fedavg import weighted_average
from medfed.algorithms.fednova import FedNova, step_weight
from medfed.core.types import Update

TRAIN = frozenset({"w"})


def _up(w, n, steps, buf=0.0):
    return Update("s", 1, {"w": torch.tensor([w]), "bn.running_var": torch.tensor([buf])}, n, steps)


def test_step_weight_hand_computed():
    assert step_weight(5, 0.0) == 5.0
    # heavy ball with a constant gradient moves 1, then 1 + 0.5: 2.5 steps' worth
    assert step_weight(2, 0.5) == pytest.approx(2.5)


def test_unequal_steps_hand_computed():
    x = {"w": torch.tensor([0.0]), "bn.running_var": torch.tensor([1.0])}
    # site a: 1 step moving 1; site b: 4 steps moving 0.5 each
    ups = [_up(-1.0, 1, 1, buf=2.0), _up(-2.0, 1, 4, buf=4.0)]
    out = FedNova(0.0, TRAIN).aggregate(x, ups)
    # d = 0.5 * 1/1 + 0.5 * 2/4 = 0.75; tau_eff = 0.5 * 1 + 0.5 * 4 = 2.5; x = -2.5 * 0.75
    assert float(out["w"]) == pytest.approx(-1.875)
    assert float(out["bn.running_var"]) == pytest.approx(3.0)  # buffers: plain weighted mean
    fedavg = weighted_average([u.params for u in ups], [1, 1])
    assert float(fedavg["w"]) == pytest.approx(-1.5)  # FedAvg leans towards the busier site


@settings(max_examples=40, deadline=None)
@given(ws=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=4),
       ns=st.lists(st.integers(1, 500), min_size=4, max_size=4),
       steps=st.integers(1, 50), momentum=st.sampled_from([0.0, 0.5, 0.9]))
def test_equal_steps_is_fedavg(ws, ns, steps, momentum):
    ups = [_up(w, n, steps) for w, n in zip(ws, ns)]
    x = {"w": torch.tensor([0.3]), "bn.running_var": torch.tensor([1.0])}
    out = FedNova(momentum, TRAIN).aggregate(x, ups)
    ref = weighted_average([u.params for u in ups], [u.num_examples for u in ups])
    assert torch.allclose(out["w"], ref["w"], atol=1e-4)


def test_zero_steps_is_refused():
    assert "num_steps must be > 0" in FedNova(0.0, TRAIN).update_problem(_up(0.0, 3, 0), {})
