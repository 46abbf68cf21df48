import pytest
import torch

from medfed.config import ModelConfig, SegmentationTaskConfig, TaskConfig
from medfed.core.errors import ModelError
from medfed.models import build_model, num_outputs

SEG2 = SegmentationTaskConfig(kind="segmentation", num_classes=2)
SEG3 = SegmentationTaskConfig(kind="segmentation", num_classes=3)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "densenet121"])
@pytest.mark.parametrize("labels,k,out", [("binary", 2, 1), ("multiclass", 5, 5), ("multilabel", 3, 3)])
def test_models_fit_channels_and_classes(name, labels, k, out):
    model = build_model(ModelConfig(name=name), TaskConfig(labels=labels, num_classes=k), in_channels=3)
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, out)


@pytest.mark.parametrize("name,size", [("small_cnn", 16), ("resnet18", 16), ("densenet121", 32)])
def test_classifiers_work_in_3d(name, size):
    model = build_model(ModelConfig(name=name, width=4), TaskConfig(labels="multiclass", num_classes=4), 1, 3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, size, size, size)).shape == (2, 4)


def test_resnet50_builds_for_one_channel():
    model = build_model(ModelConfig(name="resnet50"), TaskConfig(labels="binary"), in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 1)


def test_small_cnn_state_dict_keys_are_unchanged_and_the_same_in_3d():
    keys = [
        f"features.{i}.{part}" for i in range(3)
        for part in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")
    ] + ["head.weight", "head.bias"]
    two = build_model(ModelConfig(name="small_cnn", width=4), TaskConfig(labels="binary"), 1)
    three = build_model(ModelConfig(name="small_cnn", width=4), TaskConfig(labels="binary"), 1, spatial_dims=3)
    assert list(two.state_dict()) == keys
    assert list(three.state_dict()) == keys
    assert two.state_dict()["features.0.0.weight"].shape == (4, 1, 3, 3)
    assert three.state_dict()["features.0.0.weight"].shape == (4, 1, 3, 3, 3)
    assert hasattr(two, "head") and hasattr(three, "head")


@pytest.mark.parametrize("name", ["unet", "segresnet"])
@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
@pytest.mark.parametrize("task", [SEG2, SEG3])
def test_segmenters_give_one_logit_per_class_per_pixel(name, dims, size, task):
    model = build_model(ModelConfig(name=name, width=4), task, in_channels=2, spatial_dims=dims).eval()
    x = torch.rand((2, 2) + (size,) * dims)
    with torch.no_grad():
        assert model(x).shape == (2, task.num_classes) + (size,) * dims


def test_unet_has_batch_norm_and_width_sets_channels():
    model = build_model(ModelConfig(name="unet", width=8), SEG2, 1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 8
    assert max(c.out_channels for c in convs) == 64  # 8w at the bottom


def test_num_outputs():
    assert num_outputs(TaskConfig(labels="binary")) == 1
    assert num_outputs(TaskConfig(labels="multilabel", num_classes=4)) == 4
    assert num_outputs(SEG3) == 3


def test_zero_channels_is_an_error():
    with pytest.raises(ModelError, match="small_cnn"):
        build_model(ModelConfig(name="small_cnn"), TaskConfig(labels="binary"), in_channels=0)


def test_model_and_task_must_agree():
    with pytest.raises(ModelError, match="classifier"):
        build_model(ModelConfig(name="resnet18"), SEG2, 1)
    with pytest.raises(ModelError, match="segments"):
        build_model(ModelConfig(name="unet"), TaskConfig(labels="binary"), 1)


def test_spatial_dims_must_be_2_or_3():
    with pytest.raises(ModelError, match="spatial dimensions"):
        build_model(ModelConfig(name="small_cnn"), TaskConfig(labels="binary"), 1, spatial_dims=1)


# ---- norm: group (sample-level DP-SGD needs per-example normalisation)


@pytest.mark.parametrize("dims,size", [(2, 16), (3, 16)])
def test_small_cnn_with_group_norm_has_no_batch_norm(dims, size):
    model = build_model(ModelConfig(name="small_cnn", width=4, norm="group"), TaskConfig(labels="binary"), 1, dims)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    groups = [(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert groups == [(4, 4), (8, 8), (8, 16)]  # gcd(8, channels)
    model.train()
    assert model(torch.rand((3, 1) + (size,) * dims)).shape == (3, 1)
    keys = [f"features.{i}.{part}" for i in range(3) for part in ("0.weight", "1.weight", "1.bias")]
    assert list(model.state_dict()) == keys + ["head.weight", "head.bias"]


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
@pytest.mark.parametrize("task,groups", [(SEG2, 2), (SEG3, 1)])
def test_unet_with_group_norm_has_no_batch_norm(dims, size, task, groups):
    # gcd(8, w, K): the last upsampling block normalises the K class channels
    model = build_model(ModelConfig(name="unet", width=4, norm="group"), task, 1, dims)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {groups}
    model.train()
    assert model(torch.rand((2, 1) + (size,) * dims)).shape == (2, task.num_classes) + (size,) * dims


@pytest.mark.parametrize("name", ["densenet121", "resnet18", "resnet50"])
def test_group_norm_is_refused_for_the_monai_classifiers(name):
    with pytest.raises(ModelError, match=rf"model\.norm.*'{name}'"):
        build_model(ModelConfig(name=name, norm="group"), TaskConfig(labels="binary"), 1)


def test_segresnet_takes_either_norm():
    for norm in ("batch", "group"):
        model = build_model(ModelConfig(name="segresnet", width=8, norm=norm), SEG2, 1)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
