import pytest
import torch
from torch import nn

from medfed.algorithms.base import SiteHook
from medfed.algorithms.fedavg import weighted_average
from medfed.algorithms.scaffold import C_PREFIX, DC_PREFIX, Scaffold, ScaffoldHook
from medfed.config import ModelConfig, TaskConfig
from medfed.core.types import Arm, RoundPlan, TrainSettings, Update
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TRAIN = frozenset({"weight", "bias"})


def _plan(c, lr=0.1):
    extras = {C_PREFIX + "weight": torch.tensor([[c[0]]]), C_PREFIX + "bias": torch.tensor([c[1]])}
    return RoundPlan("j", 1, Arm.FEDERATED, TrainSettings(1, 1, lr, "sgd", 0.0, 0.0, 0), extras)


def test_one_site_step_hand_computed():
    # model y = w*x + b with w = 1, b = 0; loss 0.5 * (y - 3)^2 at x = 1: grad (w, b) = (-2, -2)
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    hook = ScaffoldHook()
    hook.on_train_start(model, _plan((0.5, -1.0)))
    loss = 0.5 * (model(torch.tensor([[1.0]])) - 3.0).pow(2).sum()
    loss.backward()
    hook.on_after_backward(model)  # corrected grad = g + c - c_i = (-1.5, -3)
    assert model.weight.grad.item() == pytest.approx(-1.5) and model.bias.grad.item() == pytest.approx(-3.0)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert model.weight.item() == pytest.approx(1.15) and model.bias.item() == pytest.approx(0.3)
    extras = hook.on_train_end(model, num_steps=1)
    # option II: c_i+ = c_i - c + (x - y) / (K lr) = -(0.5, -1) + (-0.15, -0.3) / 0.1 = (-2, -2)
    assert extras[DC_PREFIX + "weight"].item() == pytest.approx(-2.0)
    assert extras[DC_PREFIX + "bias"].item() == pytest.approx(-2.0)
    assert hook.c_i["weight"].item() == pytest.approx(-2.0)


def test_server_step_hand_computed():
    algo = Scaffold(server_lr=0.5, num_sites=4, trainable=TRAIN)
    x = {"weight": torch.tensor([[1.0]]), "bias": torch.tensor([0.0])}
    algo.round_extras(x)
    ups = [
        Update("a", 1, {"weight": torch.tensor([[1.2]]), "bias": torch.tensor([0.4])}, 1, 1,
               extras={DC_PREFIX + "weight": torch.tensor([[-2.0]]), DC_PREFIX + "bias": torch.tensor([2.0])}),
        Update("b", 1, {"weight": torch.tensor([[0.8]]), "bias": torch.tensor([0.0])}, 3, 1,
               extras={DC_PREFIX + "weight": torch.tensor([[4.0]]), DC_PREFIX + "bias": torch.tensor([0.0])}),
    ]
    out = algo.aggregate(x, ups)
    # weighted mean of y: w = (1.2 + 2.4) / 4 = 0.9, b = 0.1; x + 0.5 * (mean - x)
    assert out["weight"].item() == pytest.approx(0.95) and out["bias"].item() == pytest.approx(0.05)
    # c += (2 / 4) * mean(dc) = 0.5 * (1, 1)
    assert algo.c["weight"].item() == pytest.approx(0.5) and algo.c["bias"].item() == pytest.approx(0.5)
    assert algo.round_extras(out)[C_PREFIX + "bias"].item() == pytest.approx(0.5)


def test_zero_control_variates_and_full_server_step_is_fedavg():
    g = torch.Generator().manual_seed(1)
    data = ArraySplit(torch.rand(24, 1, 16, 16, generator=g), torch.randint(0, 2, (24,), generator=g))
    task = TaskConfig(labels="binary")
    settings = TrainSettings(1, 8, 0.1, "sgd", 0.0, 0.0, 5)
    params = []
    for hook in (ScaffoldHook(), SiteHook()):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="small_cnn", width=4), task, 1)
        hook.on_train_start(model, RoundPlan("j", 1, Arm.FEDERATED, settings))  # no c sent: zeros
        train_local(model, data, ClassificationTask(task), settings, hook, torch.device("cpu"))
        params.append(get_params(model))
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    trainable = frozenset(n for n, _ in model.named_parameters())
    algo = Scaffold(1.0, 2, trainable)
    algo.round_extras(params[1])
    dcs = {DC_PREFIX + n: torch.zeros_like(params[1][n]) for n in trainable}
    ups = [Update("a", 1, params[0], 24, 3, extras=dcs), Update("b", 1, params[1], 8, 3, extras=dcs)]
    out = algo.aggregate(params[1], ups)
    ref = weighted_average([u.params for u in ups], [24, 8])
    assert all(torch.allclose(out[k].float(), ref[k].float(), atol=1e-6) for k in ref)


def test_missing_or_bad_control_variates_are_refused():
    algo = Scaffold(1.0, 2, TRAIN)
    x = {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}
    ok = {DC_PREFIX + "weight": torch.zeros(1, 1), DC_PREFIX + "bias": torch.zeros(1)}
    assert algo.update_problem(Update("a", 1, x, 1, 1, extras=ok), x) is None
    assert "missing" in algo.update_problem(Update("a", 1, x, 1, 1, extras={}), x)
    bad = {**ok, DC_PREFIX + "bias": torch.tensor([float("nan")])}
    assert "not finite" in algo.update_problem(Update("a", 1, x, 1, 1, extras=bad), x)
