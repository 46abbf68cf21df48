"""Small MONAI Bundles written by tests (bundles cannot be downloaded here): the layout and
config keys of the Model Zoo's segmentation bundles (configs/metadata.json, train.json with
network_def, train#preprocessing/dataset/dataloader/trainer and validate#..., and the
handlers that validate and save checkpoints), at a size that trains in seconds."""

from __future__ import annotations

import json
from pathlib import Path

METADATA = {
    "version": "0.1.0", "name": "tiny_seg2d", "monai_version": "1.4.0", "pytorch_version": "2.0.0",
    "numpy_version": "1.26.0", "required_packages_version": {}, "task": "2D binary segmentation (test)",
    "description": "a tiny UNet bundle written by medfed's tests", "authors": "medfed tests",
    "copyright": "none", "network_data_format": {"inputs": {}, "outputs": {}},
}

NETWORK = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
           "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}

LOADING = [{"_target_": "LoadImaged", "keys": ["image", "label"]},
           {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]}]
DETERMINISTIC = [{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]
RANDOM = [{"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5, "spatial_axis": 0},
          {"_target_": "RandRotate90d", "keys": ["image", "label"], "prob": 0.5}]


def train_config(network: dict | None = None, random: list | None = None, validate: list | None = None) -> dict:
    """A train.json in the Model Zoo's shape; ``validate``: the validate#preprocessing
    steps after loading (default: the deterministic ones)."""
    return {
        "imports": ["$import glob", "$import torch"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/nonexistent/medfed-bundle-data",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network or NETWORK,
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.01},
        "train": {
            "preprocessing": {"_target_": "Compose",
                              "transforms": LOADING + DETERMINISTIC + (RANDOM if random is None else random)},
            "dataset": {"_target_": "Dataset",
                        "data": "$[{'image': i, 'label': i} for i in sorted(glob.glob(@dataset_dir + '/*.nii.gz'))]",
                        "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2,
                           "shuffle": True, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": 1},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            ],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": 100, "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network",
                        "loss_function": "@loss", "optimizer": "@optimizer", "inferer": "@train#inferer",
                        "train_handlers": "@train#handlers"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose",
                              "transforms": LOADING + (DETERMINISTIC if validate is None else validate)},
            "dataset": {"_target_": "Dataset", "data": "$[]", "transform": "@validate#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [{"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir",
                          "save_dict": {"model": "@network"}, "save_key_metric": True}],
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "val_handlers": "@validate#handlers"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    }


def make_bundle(folder: Path, train: dict | None = None, metadata: dict | None = None,
                inference: dict | None = None) -> Path:
    """A bundle at ``folder``: configs/metadata.json and configs/train.json (and
    configs/inference.json when given)."""
    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "metadata.json").write_text(json.dumps(metadata or METADATA, indent=1))
    (configs / "train.json").write_text(json.dumps(train if train is not None else train_config(), indent=1))
    if inference is not None:
        (configs / "inference.json").write_text(json.dumps(inference, indent=1))
    return folder


def seg_job(tmp_path: Path, model: dict, rounds: int = 2, **extra) -> dict:
    """A 2D synthetic segmentation job (1 channel, 32x32, 2 classes) at two sites."""
    return {
        "name": "bundle", "seed": 3, "output": str(tmp_path / "run"), "rounds": rounds, "threads": 1,
        "device": "cpu",
        "data": {"source": "synthetic_segmentation", "dims": 2, "image_size": 32, "sites": [
            {"name": "a", "n_train": 6, "n_val": 2, "n_test": 2},
            {"name": "b", "n_train": 6, "n_val": 2, "n_test": 2},
        ]},
        "model": model,
        "task": {"kind": "segmentation", "num_classes": 2, "hd95": False, "save_predictions": 0},
        "train": {"batch_size": 2, "lr": 0.01, "optimizer": "adam"},
        **extra,
    }
