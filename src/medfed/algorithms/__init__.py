"""Federated algorithms: each file holds a site hook and a server rule (see base.py)."""

from __future__ import annotations

from medfed.algorithms.base import Algorithm, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.config import AlgorithmConfig, FedAvgConfig


def build_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    """The algorithm object for a validated config."""
    if isinstance(cfg, FedAvgConfig):
        return FedAvg()
    raise TypeError(f"no algorithm for config {type(cfg).__name__}")


__all__ = ["Algorithm", "SiteHook", "build_algorithm"]
