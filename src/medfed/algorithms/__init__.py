"""Federated algorithms: each file holds a site hook and a server rule (see base.py)."""

from __future__ import annotations

from medfed.algorithms.base import Algorithm, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.algorithms.fedopt import FedOpt
from medfed.algorithms.fedprox import FedProx
from medfed.algorithms.scaffold import Scaffold
from medfed.config import AlgorithmConfig, FedAvgConfig, FedOptConfig, FedProxConfig, ScaffoldConfig


def build_algorithm(cfg: AlgorithmConfig, trainable: frozenset[str], num_sites: int) -> Algorithm:
    """The algorithm object for a validated config.

    ``trainable``: names of the model's trainable parameters; ``num_sites``: sites in the job.
    """
    if isinstance(cfg, FedAvgConfig):
        return FedAvg(trainable)
    if isinstance(cfg, FedProxConfig):
        return FedProx(cfg.mu, trainable)
    if isinstance(cfg, FedOptConfig):
        return FedOpt(cfg.name, cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau, trainable)
    if isinstance(cfg, ScaffoldConfig):
        return Scaffold(cfg.server_lr, num_sites, trainable)
    raise TypeError(f"no algorithm for config {type(cfg).__name__}")


__all__ = ["Algorithm", "SiteHook", "build_algorithm"]
