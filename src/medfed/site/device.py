"""Where local work runs: device choice and thread count, set explicitly, and the memory
allocator of a process that trains (core/allocator.py)."""

from __future__ import annotations

import torch

from medfed.core.allocator import tune_allocator
from medfed.core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def set_threads(n: int) -> None:
    """Fix the intra-op thread count, so runs are repeatable and workers share cores. Every
    process that trains calls it first: glibc's allocator is set for training loops there
    (:func:`~medfed.core.allocator.tune_allocator`; ``MEDFED_MALLOC=default`` leaves it)."""
    tune_allocator()
    torch.set_num_threads(max(1, int(n)))


def seed_device(seed: int, device: torch.device) -> None:
    """Seed the random draws of training on ``device`` (dropout, random crops in the model):
    the CPU's generator and, for an accelerator, those of every device of its kind. The
    same draws as ``torch.manual_seed`` for the devices in use, without its cost: that call
    also queues a seed for every kind of accelerator torch knows, recording the caller's
    stack each time (about 0.1 ms from a shallow stack, more from a deep one), once per site
    and round."""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        backend = getattr(torch, device.type)
        (getattr(backend, "manual_seed_all", None) or backend.manual_seed)(seed)
