import torch
from torch import nn

from medfed.algorithms.base import SiteHook
from medfed.algorithms.fedprox import ProximalHook
from medfed.config import ModelConfig, TaskConfig
from medfed.core.types import Arm, RoundPlan, TrainSettings
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")
SETTINGS = TrainSettings(2, 8, 0.1, "sgd", 0.9, 0.0, seed=3)
PLAN = RoundPlan("j", 1, Arm.FEDERATED, SETTINGS)


def test_proximal_term_hand_computed():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    hook = ProximalHook(mu=0.5)
    hook.on_train_start(model, PLAN)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 1.0]]))  # moved by (1, 2) from the anchor
    # mu/2 * (1^2 + 2^2) = 0.25 * 5
    assert float(hook.extra_loss(model).detach()) == 1.25


def _train(hook):
    g = torch.Generator().manual_seed(0)
    data = ArraySplit(torch.rand(32, 1, 16, 16, generator=g), torch.randint(0, 2, (32,), generator=g))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)
    start = get_params(model)
    hook.on_train_start(model, PLAN)
    train_local(model, data, ClassificationTask(TASK), SETTINGS, hook, torch.device("cpu"))
    end = get_params(model)
    drift = sum(float(((end[k] - start[k]) ** 2).sum()) for k, _ in model.named_parameters())
    return end, drift


def test_mu_zero_is_plain_local_training():
    a, _ = _train(ProximalHook(0.0))
    b, _ = _train(SiteHook())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_larger_mu_keeps_the_site_closer_to_the_global_model():
    _, free = _train(ProximalHook(0.0))
    _, pulled = _train(ProximalHook(10.0))
    assert pulled < free
