"""Networks by name: a small CNN for CPU runs and MONAI networks for real work.

All models take images of shape (B, C, H, W) and return logits of shape (B, K), where K
is 1 for a binary task and the number of classes or labels otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from medfed.config import ModelConfig, TaskConfig
from medfed.core.errors import ModelError


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head; about 25k parameters at width 16.

    Batch norm is there on purpose: federated methods that treat BN layers specially
    (FedBN) must have something to act on.
    """

    def __init__(self, in_channels: int, out_features: int, width: int = 16):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def num_outputs(task: TaskConfig) -> int:
    """Logits per example: 1 for binary, else the number of classes or labels."""
    return 1 if task.labels == "binary" else task.num_classes


def build_model(cfg: ModelConfig, task: TaskConfig, in_channels: int) -> nn.Module:
    """Build an untrained network for ``in_channels``-channel 2D images and ``task``."""
    if in_channels < 1:
        raise ModelError(f"model '{cfg.name}': input must have at least 1 channel, got {in_channels}")
    out = num_outputs(task)
    if cfg.name == "small_cnn":
        return SmallCNN(in_channels, out, cfg.width)
    from monai.networks import nets  # imported here: MONAI costs ~1 s to import

    if cfg.name == "densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=out)
    if cfg.name == "resnet18":
        return nets.resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=out)
    if cfg.name == "resnet50":
        return nets.resnet50(spatial_dims=2, n_input_channels=in_channels, num_classes=out)
    raise ModelError(f"unknown model '{cfg.name}'")  # unreachable: the config schema checks it


def get_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
