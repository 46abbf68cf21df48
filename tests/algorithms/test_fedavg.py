import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms import build_algorithm
from medfed.algorithms.fedavg import weighted_average
from medfed.config import FedAvgConfig
from medfed.core.types import Update


def test_weighted_average_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(20)}
    out = weighted_average([a, b], [1, 2])
    # (1*[1,2] + 2*[4,-1]) / 3 = [3, 0]; integer buffer (10 + 40) / 3 = 16.67 -> 17
    assert torch.allclose(out["w"], torch.tensor([3.0, 0.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 17


def test_fedavg_weights_by_examples():
    algo = build_algorithm(FedAvgConfig(), torch.nn.Linear(1, 1), 2)
    ups = [
        Update("a", 1, {"w": torch.tensor([0.0])}, num_examples=30, num_steps=1),
        Update("b", 1, {"w": torch.tensor([10.0])}, num_examples=10, num_steps=1),
    ]
    assert torch.allclose(algo.aggregate({"w": torch.tensor([5.0])}, ups)["w"], torch.tensor([2.5]))


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=6),
    weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
)
def test_average_of_identical_updates_is_that_update(values, weights):
    p = {"w": torch.tensor(values, dtype=torch.float32)}
    out = weighted_average([p] * len(weights), weights)
    assert torch.allclose(out["w"], p["w"], rtol=1e-6, atol=1e-5)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.ones(1)}], [0])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.ones(1)}], [1, 2])
