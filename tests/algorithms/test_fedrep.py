import torch

from medfed.algorithms import build_algorithm
from medfed.algorithms.base import SiteHook
from medfed.config import FedRepConfig, ModelConfig, TaskConfig
from medfed.core.types import TrainSettings
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")
SETTINGS = TrainSettings(2, 8, 0.1, "sgd", 0.9, 0.0, 11)


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)


def test_phases_train_the_head_then_the_body():
    model = _model()
    algo = build_algorithm(FedRepConfig(name="fedrep", personal_layers=["head"], head_epochs=3), model, 2)
    assert algo.local_keys == {"head.weight", "head.bias"}
    first, second = algo.make_site_hook().phases(SETTINGS, get_params(model))
    assert first.settings.local_epochs == 3 and second.settings == SETTINGS
    assert second.frozen == {"head.weight", "head.bias"} and first.keep is None and second.keep is None
    assert "features.0.0.weight" in first.frozen and not (first.frozen & second.frozen)


def test_frozen_parameters_do_not_move_and_are_released_afterwards():
    g = torch.Generator().manual_seed(0)
    data = ArraySplit(torch.rand(32, 1, 16, 16, generator=g), torch.randint(0, 2, (32,), generator=g))
    model = _model()
    before = get_params(model)
    frozen = frozenset({"head.weight", "head.bias", "features.0.0.weight"})
    train_local(model, data, ClassificationTask(TASK), SETTINGS, SiteHook(), torch.device("cpu"), frozen)
    after = get_params(model)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["features.1.0.weight"], after["features.1.0.weight"])
    assert all(p.requires_grad for p in model.parameters())
