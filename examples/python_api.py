"""medfed from Python: three hospitals' own PyTorch datasets and a network of your own.

Run it with ``python examples/python_api.py [OUTPUT_FOLDER]`` (default runs/python-api).
Any ``torch.utils.data.Dataset`` of ``(image, target)`` pairs works; here, random 1x16x16
images whose label is whether their centre is brighter than their border.
"""

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import medfed


def hospital(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    y = (torch.rand(n, generator=g) < 0.5).long()
    x[y == 1, :, 5:11, 5:11] += 0.5  # a bright "lesion" in the positives
    return TensorDataset(x, y)


def my_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1))


job = {
    "name": "python-api",
    "output": sys.argv[1] if len(sys.argv) > 1 else "runs/python-api",
    "rounds": 2,
    "device": "cpu",
    "task": {"kind": "classification", "labels": "binary", "num_classes": 2, "monitor": "auc"},
    "algorithm": {"name": "fedavg"},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
    "compare": ["local"],
}
datasets = {
    name: {"train": hospital(48, 3 * i), "val": hospital(16, 3 * i + 1), "test": hospital(16, 3 * i + 2)}
    for i, name in enumerate(["hospital_a", "hospital_b", "hospital_c"])
}
result = medfed.run(job, datasets=datasets, model=my_net, overwrite=True)
test_auc = {r["site"]: r["value"] for r in result.metrics  # the last round's value wins
            if r["arm"] == "federated" and r["split"] == "test" and r["metric"] == "auc" and r["site"] != "all"}
print(f"run folder: {result.run_dir}; {len(result.metrics)} metric records; federated test AUC by site: "
      + ", ".join(f"{site} {v:.3f}" for site, v in test_auc.items()))
