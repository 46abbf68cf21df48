"""MONAI Bundles: ``model: {bundle: FOLDER}`` (the bundle's network in medfed's loop),
``bundle_transforms`` (its preprocessing as medfed's reading step) and ``train.engine:
bundle`` (its own trainer through ``monai.fl``), on bundles written by the test."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml

import medfed
from bundle_files import DETERMINISTIC, RANDOM, make_bundle, seg_job, train_config
from medfed.config import BundleModelConfig, parse_job
from medfed.core.errors import ConfigError, MedfedError, ModelError
from medfed.tracking.metrics import read_metrics

pytest.importorskip("ignite", reason="train.engine: bundle needs pytorch-ignite: pip install -e '.[bundle]'")


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _final(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model_final.safetensors")


def _engine_job(tmp_path, bundle, out="run", **model) -> dict:
    job = seg_job(tmp_path, {"bundle": str(bundle), **model})
    job["output"] = str(tmp_path / out)
    job["train"] = {"engine": "bundle", "local_epochs": 1}
    return job


def test_the_bundles_network_trains_in_medfeds_loop(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    before = _files(bundle)
    result = medfed.run(seg_job(tmp_path, {"bundle": str(bundle)}, rounds=1), progress=False)
    dice = [r for r in result.metrics if r["metric"] == "dice" and r["arm"] == "federated"]
    assert dice and all(0.0 <= r["value"] <= 1.0 for r in dice)
    marker = json.loads((result.run_dir / "run.json").read_text())
    assert marker["model"] == "MONAI Bundle 'bundle'" and len(marker["bundle_sha256"]) == 64
    assert any(k.startswith("model.0.conv.unit0") for k in _final(result.run_dir))  # the bundle's UNet
    assert _files(bundle) == before  # nothing written into the bundle


def test_engine_bundle_trains_with_the_bundles_own_trainer(tmp_path):
    """The bundle's optimizer trains: with its learning rate 0 the weights stay exactly as
    they started (medfed's loop with lr 0.01 would move them), and with 0.01 they move; the
    same job twice gives the same metrics; the bundle folder is left as it was."""
    still = train_config()
    still["optimizer"]["lr"] = 0.0
    frozen_bundle = make_bundle(tmp_path / "still", still)
    frozen = medfed.run(_engine_job(tmp_path, frozen_bundle, "still-run"), progress=False)
    initial = medfed.run(dict(_engine_job(tmp_path, frozen_bundle, "zero-rounds"), rounds=1), progress=False)
    a, b = _final(frozen.run_dir), _final(initial.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    bundle = make_bundle(tmp_path / "bundle")
    before = _files(bundle)
    runs = [medfed.run(_engine_job(tmp_path, bundle, f"run{i}"), progress=False) for i in range(2)]
    moved = _final(runs[0].run_dir)
    assert any(not torch.equal(moved[k], a[k]) for k in a if k.endswith("weight"))
    assert read_metrics(runs[0].run_dir / "metrics.jsonl") == read_metrics(runs[1].run_dir / "metrics.jsonl")
    losses = [r["value"] for r in runs[0].metrics if r["metric"] == "loss" and r["arm"] == "federated"]
    assert losses and all(v == v and v > 0 for v in losses)  # the bundle's DiceCE loss, reported per round
    assert _files(bundle) == before  # its CheckpointSaver, TensorBoard and validation handlers were off


def test_bundle_transforms_read_every_example_through_the_bundle(tmp_path):
    from medfed.data.sites import build_sites

    config = train_config(validate=[{"_target_": "ScaleIntensityd", "keys": "image", "minv": -5.0, "maxv": -4.0}])
    bundle = make_bundle(tmp_path / "bundle", config)
    job = parse_job(seg_job(tmp_path, {"bundle": str(bundle), "bundle_transforms": True}))
    for site in build_sites(job):
        for split in (site.train, site.val, site.test):
            assert split.images.min() >= -5.0 - 1e-5 and split.images.max() <= -4.0 + 1e-5
            assert split.labels.dtype == torch.int64 and set(split.labels.unique().tolist()) <= {0, 1}
    plain = build_sites(parse_job(seg_job(tmp_path, {"bundle": str(bundle)})))
    assert plain[0].train.images.min() >= 0.0  # without bundle_transforms: medfed's reading as before


def test_the_job_hash_counts_the_bundles_code_not_its_path(tmp_path):
    bundle = make_bundle(tmp_path / "one")
    moved = shutil.copytree(bundle, tmp_path / "two")
    (moved / "models").mkdir()
    (moved / "models" / "model.pt").write_bytes(b"weights do not count")
    one = parse_job(seg_job(tmp_path, {"bundle": str(bundle)}))
    two = parse_job(seg_job(tmp_path, {"bundle": str(moved)}))
    assert one.job_hash() == two.job_hash() and one.model.bundle_sha256 == two.model.bundle_sha256
    changed = train_config()
    changed["optimizer"]["lr"] = 0.02
    (moved / "configs" / "train.json").write_text(json.dumps(changed))
    assert parse_job(seg_job(tmp_path, {"bundle": str(moved)})).job_hash() != one.job_hash()
    again = parse_job(yaml.safe_load(one.to_yaml()))
    assert isinstance(again.model, BundleModelConfig) and again.job_hash() == one.job_hash()
    plain = seg_job(tmp_path, {"name": "unet"})
    assert parse_job(plain).job_hash() == parse_job(dict(plain, train={**plain["train"], "engine": "medfed"})).job_hash()


def _no_network() -> dict:
    config = train_config()
    del config["network_def"]
    config["network"] = "$None"
    return config


def _bad_network() -> dict:
    return train_config(network={"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                                 "channels": [4], "strides": []})


@pytest.mark.parametrize("case,expected", [
    ("missing", "is not a folder; give the folder of a MONAI Bundle"),
    ("no_metadata", "is not a MONAI Bundle: it has no configs/metadata.json"),
    ("pinned", "model.bundle_sha256: the job pins"),
    ("config_file", "model.config: the bundle"),
    ("engine_without_bundle", "train.engine: 'bundle' trains with a MONAI Bundle's own trainer"),
    ("engine_fedprox", "train.engine: the bundle's trainer runs the plain training its authors wrote, but 'fedprox'"),
    ("engine_freeze", "model.freeze: not used with train.engine: bundle"),
    ("engine_augment", "transforms.augment: not used with train.engine: bundle"),
    ("both_preprocessing", "model.bundle_transforms: the bundle's preprocessing reads every example"),
])
def test_bad_bundle_jobs_name_the_field(tmp_path, case, expected):
    bundle = make_bundle(tmp_path / "bundle")
    model = {"bundle": str(bundle)}
    job = seg_job(tmp_path, model)
    if case == "missing":
        model["bundle"] = str(tmp_path / "nowhere")
    elif case == "no_metadata":
        (bundle / "configs" / "metadata.json").unlink()
    elif case == "pinned":
        model["bundle_sha256"] = "0" * 64
    elif case == "config_file":
        model["config"] = "evaluate.json"
        job = seg_job(tmp_path, model)
        with pytest.raises(ConfigError) as e:
            medfed.validate(job)
        assert expected in str(e.value) and "train.json" in str(e.value)
        return
    elif case == "engine_without_bundle":
        job = seg_job(tmp_path, {"name": "unet"}, train={"engine": "bundle"})
    elif case == "engine_fedprox":
        job = _engine_job(tmp_path, bundle)
        job["algorithm"] = {"name": "fedprox", "mu": 0.01}
    elif case == "engine_freeze":
        job = _engine_job(tmp_path, bundle, freeze=["model.0."])
    elif case == "engine_augment":
        job = dict(_engine_job(tmp_path, bundle), transforms={"augment": [{"name": "flip"}]})
    elif case == "both_preprocessing":
        job = seg_job(tmp_path, {"bundle": str(bundle), "bundle_transforms": True},
                      transforms={"preprocess": [{"name": "normalize"}]})
    with pytest.raises(ConfigError) as e:
        parse_job(job)
    assert expected in str(e.value)


@pytest.mark.parametrize("config,error,expected", [
    (_no_network(), ConfigError, "has no network_def, the network a bundle must define"),
    (_bad_network(), ModelError, "building its network ('network_def') raised"),
])
def test_a_bundle_without_a_working_network_is_a_clear_error(tmp_path, config, error, expected):
    bundle = make_bundle(tmp_path / "bundle", config)
    with pytest.raises(error) as e:
        medfed.validate(seg_job(tmp_path, {"bundle": str(bundle)}))
    assert expected in str(e.value) and str(bundle) in str(e.value)


def test_bundle_transforms_refuse_random_reading(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", train_config(validate=DETERMINISTIC + RANDOM[:1]))
    with pytest.raises(ConfigError) as e:
        medfed.run(seg_job(tmp_path, {"bundle": str(bundle), "bundle_transforms": True}), progress=False)
    assert "holds random transforms (RandFlipd)" in str(e.value)


def test_a_bundle_trainer_that_fails_is_a_clear_error(tmp_path, caplog):
    """Each site is left out with the bundle's own reason (MONAI's wrapped cause included),
    and the round fails on its quorum."""
    config = copy.deepcopy(train_config())
    config["loss"] = {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "lambda_dice": -1.0}
    bundle = make_bundle(tmp_path / "bundle", config)
    with pytest.raises(MedfedError) as e:
        medfed.run(_engine_job(tmp_path, bundle), progress=False)
    assert "the quorum is 2 (failed: a, b)" in str(e.value)
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 2 and all("model.bundle" in m and "setting up its trainer raised" in m for m in said)
    assert all("lambda_dice should be no less than 0" in m for m in said)


def test_a_pinned_digest_must_look_like_one(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    with pytest.raises(ConfigError) as e:
        parse_job(seg_job(tmp_path, {"bundle": str(bundle), "bundle_sha256": "abc"}))
    assert "model.bundle_sha256: must be 64 lowercase hex digits (a SHA-256), got 'abc'" in str(e.value)
