import pytest
import torch

from medfed.config import ModelConfig, TaskConfig
from medfed.core.errors import ModelError
from medfed.models import build_model


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "densenet121"])
@pytest.mark.parametrize("labels,k,out", [("binary", 2, 1), ("multiclass", 5, 5), ("multilabel", 3, 3)])
def test_models_fit_channels_and_classes(name, labels, k, out):
    model = build_model(ModelConfig(name=name), TaskConfig(labels=labels, num_classes=k), in_channels=3)
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, out)


def test_resnet50_builds_for_one_channel():
    model = build_model(ModelConfig(name="resnet50"), TaskConfig(labels="binary"), in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 1)


def test_zero_channels_is_an_error():
    with pytest.raises(ModelError, match="small_cnn"):
        build_model(ModelConfig(name="small_cnn"), TaskConfig(labels="binary"), in_channels=0)
