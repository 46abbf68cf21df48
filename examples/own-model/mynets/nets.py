"""A small CNN that medfed builds from a job's ``model`` section:

    model:
      import: "mynets.nets:build"
      args: {channels: 8}

medfed calls ``build(channels=8, in_channels=..., out_channels=..., spatial_dims=...)``:
``args`` as given, plus the sizes this signature asks for, taken from the data (input
channels, 2D or 3D) and the task (one logit for a binary task, else one per class or
label). Anything without a default that medfed does not fill must be in ``args``.
"""

from __future__ import annotations

from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class TinyCNN(nn.Module):
    """Two conv-ReLU blocks (the second strided), a global average pool and a linear head."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, channels: int):
        super().__init__()
        conv = _CONV[spatial_dims]
        self.features = nn.Sequential(
            conv(in_channels, channels, 3, padding=1), nn.ReLU(),
            conv(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = _POOL[spatial_dims](1)
        self.head = nn.Linear(2 * channels, out_channels)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def build(in_channels: int, out_channels: int, spatial_dims: int = 2, channels: int = 8) -> nn.Module:
    """The factory a job names: medfed fills the three sizes; ``channels`` is this
    network's own argument (the first block's width), set in the job's ``model.args``."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return TinyCNN(in_channels, out_channels, spatial_dims, channels)
