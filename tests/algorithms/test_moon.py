import math

import pytest
import torch
from torch import nn

from medfed.algorithms.base import SiteHook
from medfed.algorithms.moon import MoonHook, contrastive_loss, representation
from medfed.config import ModelConfig, TaskConfig
from medfed.core.types import Arm, RoundPlan, TrainSettings
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")
SETTINGS = TrainSettings(1, 8, 0.05, "sgd", 0.9, 0.0, 4)
PLAN = RoundPlan("j", 1, Arm.FEDERATED, SETTINGS)


def test_contrastive_loss_hand_computed():
    z = torch.tensor([[1.0, 0.0]])
    same = torch.tensor([[2.0, 0.0]])  # cosine 1
    orth = torch.tensor([[0.0, 3.0]])  # cosine 0
    # -log(e^(1/0.5) / (e^(1/0.5) + e^0)) = log(1 + e^-2)
    assert float(contrastive_loss(z, same, orth, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)))
    # swapping positive and negative: log(1 + e^2)
    assert float(contrastive_loss(z, orth, same, 0.5)) == pytest.approx(math.log(1 + math.exp(2)))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_representation_is_the_classifier_input(name):
    model = build_model(ModelConfig(name=name, width=4), TASK, 1).eval()
    z = representation(model, torch.rand(3, 1, 28, 28))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert z.shape == (3, head.in_features)


def _data():
    g = torch.Generator().manual_seed(0)
    return ArraySplit(torch.rand(32, 1, 16, 16, generator=g), torch.randint(0, 2, (32,), generator=g))


def _train(hook, model):
    hook.on_train_start(model, PLAN)
    stats = train_local(model, _data(), ClassificationTask(TASK), SETTINGS, hook, torch.device("cpu"))
    hook.on_train_end(model, stats.num_steps)
    return get_params(model)


def test_first_round_is_plain_training_then_the_term_acts():
    torch.manual_seed(0)
    a = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)
    torch.manual_seed(0)
    b = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)
    moon, plain = MoonHook(mu=5.0, tau=0.5), SiteHook()
    pa, pb = _train(moon, a), _train(plain, b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # no previous model yet: no term
    assert moon.previous is not None and not moon._handles  # hooks removed, previous model kept
    pa, pb = _train(moon, a), _train(plain, b)
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)  # second round: the term changes training
