import pytest
import torch
from torch import nn

from medfed.algorithms.feddyn import DynamicRegularizerHook, FedDyn
from medfed.core.types import Arm, RoundPlan, TrainSettings, Update

PLAN = RoundPlan("j", 1, Arm.FEDERATED, TrainSettings(1, 1, 0.1, "sgd", 0.0, 0.0, 0))


def test_server_two_rounds_hand_computed():
    algo = FedDyn(alpha=0.5, num_sites=2, trainable=frozenset({"w"}))
    x = {"w": torch.tensor([0.0])}
    x = algo.aggregate(x, [Update("a", 1, {"w": torch.tensor([1.0])}, 1, 1), Update("b", 1, {"w": torch.tensor([3.0])}, 9, 1)])
    # h = -0.5 * (1 + 3) / 2 = -1; x = mean(y) - h / alpha = 2 + 2 (plain mean: sizes do not matter)
    assert float(x["w"]) == pytest.approx(4.0)
    x = algo.aggregate(x, [Update("a", 2, {"w": torch.tensor([5.0])}, 1, 1), Update("b", 2, {"w": torch.tensor([5.0])}, 1, 1)])
    # h = -1 - 0.5 * (1 + 1) / 2 = -1.5; x = 5 + 3
    assert float(x["w"]) == pytest.approx(8.0)


def test_site_regularizer_and_state_hand_computed():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    hook = DynamicRegularizerHook(alpha=0.5)
    hook.on_train_start(model, PLAN)  # x = 1, g = 0
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert float(hook.extra_loss(model).detach()) == pytest.approx(0.5 * 0.5 * 4)  # alpha/2 * (3 - 1)^2
    hook.on_train_end(model, 1)
    assert float(hook.g["weight"]) == pytest.approx(-1.0)  # 0 - 0.5 * (3 - 1)
    hook.on_train_start(model, PLAN)  # next round starts at x = 3
    assert float(hook.extra_loss(model).detach()) == pytest.approx(3.0)  # -(-1 * 3) + 0
