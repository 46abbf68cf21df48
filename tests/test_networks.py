"""Networks beyond the six by name: any class of monai.networks.nets and the user's factories
(``model: {monai: ...}``, ``model: {import: ...}``), checked against their signatures."""

import hashlib
import json
import sys
import textwrap

import pytest
import torch
import yaml
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import (
    ImportModelConfig,
    Job,
    ModelConfig,
    MonaiModelConfig,
    SegmentationTaskConfig,
    TaskConfig,
    builtin_job_path,
    load_job,
    parse_job,
    without_reading,
)
from medfed.core.errors import ConfigError, ModelError
from medfed.models import build_model, check_model
from medfed.server.runner import run_job
from medfed.tracking.metrics import read_metrics

SEG2 = SegmentationTaskConfig(kind="segmentation", num_classes=2)

# a DenseNet small enough for CPU tests: medfed fills spatial_dims, in_channels, out_channels
SMALL_DENSENET = {"monai": "DenseNet", "args": {"init_features": 4, "growth_rate": 4, "block_config": [1, 1],
                                                "bn_size": 2}}


def _job(tmp_path, model, **overrides) -> Job:
    body = {
        "name": "nets", "seed": 2, "output": str(tmp_path / "run"), "rounds": 1, "threads": 1,
        "data": {"source": "synthetic", "image_size": 16, "sites": [
            {"name": "a", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5},
            {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5},
        ]},
        "model": model,
        "task": {"labels": "binary"},
        "train": {"batch_size": 8, "lr": 0.05},
    }
    body.update(overrides)
    return parse_job(body)


def _seg3d_job(tmp_path, model) -> Job:
    return parse_job({
        "name": "seg3d", "seed": 1, "output": str(tmp_path / "run"), "rounds": 1, "threads": 2,
        "data": {"source": "synthetic_segmentation", "dims": 3, "image_size": 32, "sites": [
            {"name": "a", "n_train": 2, "n_val": 1, "n_test": 1},
            {"name": "b", "n_train": 2, "n_val": 1, "n_test": 1},
        ]},
        "model": model,
        "task": {"kind": "segmentation", "num_classes": 2, "hd95": False, "save_predictions": 0},
        "train": {"batch_size": 2, "lr": 0.001, "optimizer": "adam"},
    })


def _dice(run_dir) -> list:
    rec = read_metrics(run_dir / "metrics.jsonl")
    return [r["value"] for r in rec if r["metric"] == "dice" and r["site"] == "all" and r["arm"] == "federated"]


# ---- the job's three forms


def test_the_three_forms_parse_and_travel_through_yaml(tmp_path):
    monai = _job(tmp_path, SMALL_DENSENET)
    assert isinstance(monai.model, MonaiModelConfig) and monai.model.args["block_config"] == [1, 1]
    factory = _job(tmp_path, {"import": "my_nets.models:make", "args": {"width": 8}})
    assert isinstance(factory.model, ImportModelConfig) and factory.model.factory == "my_nets.models:make"
    dumped = yaml.safe_load(factory.to_yaml())["model"]
    assert dumped["import"] == "my_nets.models:make" and "factory" not in dumped  # written as the user writes it
    for job in (monai, factory):
        again = parse_job(yaml.safe_load(job.to_yaml()))
        assert again == job and again.job_hash() == job.job_hash()
    assert isinstance(_job(tmp_path, {"name": "unet"}, data={"source": "synthetic_segmentation", "sites": [
        {"name": "a", "n_train": 4, "n_test": 2}]}, task={"kind": "segmentation"}).model, ModelConfig)


@pytest.mark.parametrize("model,expected", [
    ({"monai": "Swin UNETR"}, "model.monai: must be a class name of monai.networks.nets"),
    ({"import": "my_nets.make"}, "model.import: must be 'package.module:factory'"),
    ({"monai": "DenseNet", "name": "unet"}, "model.name: is not a known field"),
    ({"monai": "DenseNet", "width": 4}, "model.width: is not a known field"),
    ({"import": "a.b:c", "monai": "DenseNet"}, "model.import: is not a known field"),
    ({"name": "small_cnn", "init": "weights.bin"}, "model.init: must be a .safetensors file or a PyTorch"),
    ({"name": "small_cnn", "init_keys": "loose"}, "model.init_keys: must be one of"),
    ({"name": "small_cnn", "init_sha256": "ab" * 32}, "init_sha256 pins the init file, but init is not set"),
    ({"name": "vgg16"}, "model.name: unknown model name"),
    ({"width": 4}, "model.name: is required"),
])
def test_bad_model_sections_name_the_field(tmp_path, model, expected):
    with pytest.raises(ConfigError, match=".*") as e:
        _job(tmp_path, model)
    assert expected in str(e.value)


def test_the_six_names_keep_their_job_hash_bit_for_bit(tmp_path):
    """The hash of a job that names one of the six networks is what it was before the other
    forms, init and freeze existed: the dump with the model's three fields only."""
    jobs = [load_job(builtin_job_path())]
    for name in ("small_cnn", "densenet121", "resnet18", "resnet50"):
        jobs.append(_job(tmp_path, {"name": name, "width": 8, "norm": "batch"}))
    seg = {"source": "synthetic_segmentation", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}
    for name in ("unet", "segresnet"):
        jobs.append(_job(tmp_path, {"name": name}, data=seg, task={"kind": "segmentation"}))
    for job in jobs:
        body = job.model_dump(mode="json", exclude={"output"})
        body["data"] = without_reading(body["data"])
        body["model"] = {k: body["model"][k] for k in ("name", "width", "norm")}
        # nor task.loss and task.class_weights at their defaults (they came later still)
        body["task"] = {k: v for k, v in body["task"].items() if k not in ("loss", "class_weights")}
        body["train"].pop("engine")  # nor train.engine, topology and contribution at their defaults (later again)
        body.pop("topology")
        body.pop("contribution")
        body.pop("ray", None)
        body.pop("generalization")
        for field in ("candidates", "exclude", "sharpness", "explore", "min_rate"):  # by loss, adaptive, unbiased
            body["sampling"].pop(field)
        body["privacy"].pop("he")  # nor privacy.he unset (later again)
        assert job.job_hash() == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    frozen = _job(tmp_path, {"name": "small_cnn", "freeze": ["head."]})
    assert frozen.job_hash() != _job(tmp_path, {"name": "small_cnn"}).job_hash()  # a freeze counts


# ---- MONAI classes


def test_a_monai_classifier_gets_the_data_and_task_sizes():
    cfg = MonaiModelConfig.model_validate(SMALL_DENSENET)
    model = build_model(cfg, TaskConfig(labels="multiclass", num_classes=3), in_channels=2, spatial_dims=2).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 2, 16, 16)).shape == (2, 3)
    three_d = build_model(cfg, TaskConfig(labels="binary"), in_channels=1, spatial_dims=3).eval()
    with torch.no_grad():
        assert three_d(torch.rand(2, 1, 16, 16, 16)).shape == (2, 1)


def test_a_class_with_other_size_names_is_filled_under_them():
    # ResNet names them n_input_channels and num_classes
    cfg = MonaiModelConfig.model_validate({"monai": "ResNet", "args": {
        "block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8]}})
    model = build_model(cfg, TaskConfig(labels="multilabel", num_classes=4), in_channels=3, spatial_dims=2).eval()
    assert model.conv1.in_channels == 3
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_sizes_the_job_sets_are_not_overwritten():
    cfg = MonaiModelConfig.model_validate({"monai": "BasicUNet", "args": {"out_channels": 5, "features": [4] * 6}})
    model = build_model(cfg, SEG2, in_channels=1, spatial_dims=2).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 5, 32, 32)


def test_an_unknown_class_names_the_closest():
    with pytest.raises(ConfigError, match=r"model\.monai: .*no network class 'SwinUNTER'; did you mean SwinUNETR"):
        check_model(MonaiModelConfig(monai="SwinUNTER"))


def test_a_function_of_monai_nets_is_not_taken_as_a_class():
    with pytest.raises(ConfigError, match=r"model\.monai: .*resnet18 is of type function.*"
                                          r"import: \"monai\.networks\.nets:resnet18\""):
        check_model(MonaiModelConfig(monai="resnet18"))


def test_an_argument_the_class_does_not_take_names_the_field_and_the_accepted_names():
    cfg = MonaiModelConfig(monai="DynUNet", args={"kernel": [3, 3], "strides": [1, 2], "upsample_kernel_size": [2]})
    with pytest.raises(ConfigError) as e:
        check_model(cfg)
    msg = str(e.value)
    assert msg.startswith("model.args.kernel: monai.networks.nets.DynUNet takes no argument 'kernel'")
    assert "did you mean kernel_size" in msg and "it takes: spatial_dims, in_channels, out_channels, kernel_size" in msg


def test_a_required_argument_medfed_does_not_fill_must_be_given():
    with pytest.raises(ConfigError, match=r"model\.args\.kernel_size: .*DynUNet needs 'kernel_size', 'strides', "
                                          r"'upsample_kernel_size' \(no default\)"):
        check_model(MonaiModelConfig(monai="DynUNet"))


def test_a_class_that_refuses_its_arguments_is_a_model_error_without_traceback():
    cfg = MonaiModelConfig(monai="DenseNet", args={"init_features": 4, "growth_rate": 4, "block_config": [1],
                                                    "act": "no_such_activation"})
    with pytest.raises(ModelError, match=r"model\.monai: monai\.networks\.nets\.DenseNet raised \w+Error: .*check "
                                         r"model\.args") as e:
        build_model(cfg, TaskConfig(labels="binary"), 1)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_validate_checks_a_monai_class_and_its_arguments(tmp_path):
    runner = CliRunner()
    job = _job(tmp_path, SMALL_DENSENET)
    good = tmp_path / "good.yaml"
    good.write_text(job.to_yaml())
    r = runner.invoke(app, ["validate", str(good)])
    assert r.exit_code == 0, r.output
    assert "model monai.networks.nets.DenseNet" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(job.to_yaml().replace("growth_rate", "growth"))
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code != 0 and "model.args.growth: monai.networks.nets.DenseNet takes no argument 'growth'" in r.output
    assert "Traceback" not in r.output


def test_a_run_refuses_bad_arguments_before_it_reads_data_or_writes(tmp_path, monkeypatch):
    from medfed.data import sites

    def never(*a, **k):
        raise AssertionError("the data was read")

    monkeypatch.setattr(sites, "build_sites", never)
    job = _job(tmp_path, {"monai": "DenseNet", "args": {"growth": 4}})
    with pytest.raises(ConfigError, match=r"model\.args\.growth"):
        run_job(job)
    assert not (tmp_path / "run").exists()


def test_a_small_monai_classifier_runs_a_federated_round(tmp_path):
    run = run_job(_job(tmp_path, SMALL_DENSENET, compare=["local"])).run_dir
    rec = read_metrics(run / "metrics.jsonl")
    assert {r["arm"] for r in rec} == {"federated", "local"}
    auc = [r["value"] for r in rec if r["metric"] == "auc" and r["site"] == "all" and r["split"] == "test"]
    assert auc and all(v is None or 0.0 <= v <= 1.0 for v in auc)


def test_swinunetr_trains_a_round_on_3d_synthetic_segmentation(tmp_path):
    # 32^3 halves five times to 1 voxel, where instance norm (the default) cannot train: group norm
    job = _seg3d_job(tmp_path, {"monai": "SwinUNETR", "args": {
        "feature_size": 12, "depths": [1, 1, 1, 1], "window_size": 4, "norm_name": ["group", {"num_groups": 4}]}})
    run = run_job(job).run_dir
    dice = _dice(run)
    assert dice and all(v is not None and 0.0 <= v <= 1.0 for v in dice)
    from safetensors import safe_open

    with safe_open(str(run / "model_final.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("swinViT.") for k in keys)  # it is the SwinUNETR that trained


def test_dynunet_trains_a_round_on_3d_synthetic_segmentation(tmp_path):
    job = _seg3d_job(tmp_path, {"monai": "DynUNet", "args": {
        "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16],
        "norm_name": ["group", {"num_groups": 2}]}})
    run = run_job(job).run_dir
    dice = _dice(run)
    assert dice and all(v is not None and 0.0 <= v <= 1.0 for v in dice)


# ---- the user's factories

FACTORY_CODE = '''
import torch
from torch import nn


def make(in_channels, num_classes, width=4):
    """A classifier; medfed fills in_channels and num_classes."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


class Net(nn.Module):
    def __init__(self, in_channels, out_channels, spatial_dims=2, **options):
        super().__init__()
        self.spatial_dims, self.options = spatial_dims, options
        self.body = nn.Linear(in_channels, out_channels)


def broken(width=4):
    raise ValueError("width must be even")


def not_a_module():
    return 3


NOT_CALLABLE = 7
'''


@pytest.fixture
def nets_package(tmp_path, monkeypatch):
    """A package of the user's networks, on sys.path for this test only."""
    pkg = tmp_path / "lib" / "medfed_test_nets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(FACTORY_CODE))
    (pkg / "needs_dep.py").write_text("import medfed_no_such_dependency\n")
    (pkg / "fails.py").write_text("raise RuntimeError('cannot start')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    yield "medfed_test_nets"
    for name in [m for m in sys.modules if m.startswith("medfed_test_nets")]:
        del sys.modules[name]


def _factory(path, **args):
    return ImportModelConfig.model_validate({"import": path, "args": args})


def test_a_factory_gets_the_sizes_its_signature_takes(nets_package):
    five = TaskConfig(labels="multiclass", num_classes=5)
    model = build_model(_factory(f"{nets_package}.models:make", width=6), five, in_channels=3)
    assert model[0].in_channels == 3 and model[0].out_channels == 6 and model[-1].out_features == 5
    net = build_model(_factory(f"{nets_package}.models:Net", depth=2), SEG2, in_channels=2, spatial_dims=3)
    assert net.spatial_dims == 3 and net.options == {"depth": 2}  # **options: any argument is taken
    assert (net.body.in_features, net.body.out_features) == (2, 2)


def test_yaml_lists_reach_a_monai_class_as_tuples_and_a_factory_as_written(nets_package):
    cfg = MonaiModelConfig(monai="DynUNet", args={"kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                                                  "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]})
    model = build_model(cfg, SEG2, in_channels=1, spatial_dims=2)
    assert model.kernel_size == (3, 3, 3) and model.filters == (4, 8, 16)  # as MONAI's own defaults are
    net = build_model(_factory(f"{nets_package}.models:Net", sizes=[1, 2]), SEG2, in_channels=1)
    assert net.options == {"sizes": [1, 2]}


def test_a_factory_runs_a_federated_round(tmp_path, nets_package):
    run = run_job(_job(tmp_path, {"import": f"{nets_package}.models:make", "args": {"width": 4}})).run_dir
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("path,args,error,expected", [
    ("medfed_no_such_package.nets:make", {}, ConfigError,
     ("model.import: no module named 'medfed_no_such_package.nets' here (missing: 'medfed_no_such_package'); "
      "install the package that holds it, or put its folder on PYTHONPATH, wherever the run happens (the server "
      "and every site): medfed never sends code from the server")),
    ("{pkg}.nowhere:make", {}, ConfigError, "model.import: no module named '{pkg}.nowhere' here"),
    ("{pkg}.needs_dep:make", {}, ConfigError,
     "model.import: importing '{pkg}.needs_dep' failed: it needs module 'medfed_no_such_dependency'"),
    ("{pkg}.fails:make", {}, ConfigError, "model.import: importing '{pkg}.fails' failed: RuntimeError: cannot start"),
    ("{pkg}.models:mak", {}, ConfigError, "model.import: '{pkg}.models' has no attribute 'mak'; did you mean make?"),
    ("{pkg}.models:NOT_CALLABLE", {}, ConfigError,
     "model.import: '{pkg}.models:NOT_CALLABLE' is of type int, not a class"),
    ("{pkg}.models:make", {"dropout": 0.1}, ConfigError,
     ("model.args.dropout: factory '{pkg}.models:make' takes no argument 'dropout'; it takes: in_channels, "
      "num_classes, width")),
    ("{pkg}.models:broken", {}, ModelError,
     ("model.import: factory '{pkg}.models:broken' raised ValueError: width must be even (called with no "
      "arguments); check model.args")),
    ("{pkg}.models:not_a_module", {}, ModelError,
     "model.import: factory '{pkg}.models:not_a_module' returned an object of type int, not a torch.nn.Module"),
])
def test_factory_errors_say_what_and_where(nets_package, path, args, error, expected):
    with pytest.raises(error) as e:
        build_model(_factory(path.format(pkg=nets_package), **args), TaskConfig(labels="binary"), 1)
    assert str(e.value).startswith(expected.format(pkg=nets_package))
    assert e.value.__cause__ is None
