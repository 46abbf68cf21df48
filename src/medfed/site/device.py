"""Where local work runs: device choice and thread count, set explicitly."""

from __future__ import annotations

import torch

from medfed.core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def set_threads(n: int) -> None:
    """Fix the intra-op thread count, so runs are repeatable and workers share cores."""
    torch.set_num_threads(max(1, int(n)))
