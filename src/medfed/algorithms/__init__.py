"""Federated algorithms: each file holds a site hook and a server rule (see base.py)."""

from __future__ import annotations

from torch import nn

from medfed.algorithms.base import Algorithm, SiteHook, norm_keys, trainable_keys
from medfed.algorithms.ditto import Ditto
from medfed.algorithms.fedavg import FedAvg
from medfed.algorithms.fedbn import FedBN
from medfed.algorithms.feddyn import FedDyn
from medfed.algorithms.fednova import FedNova
from medfed.algorithms.fedper import FedPer, layer_keys
from medfed.algorithms.fedrep import FedRep
from medfed.algorithms.moon import Moon
from medfed.algorithms.fedopt import FedOpt
from medfed.algorithms.fedprox import FedProx
from medfed.algorithms.scaffold import Scaffold
from medfed.config import (
    AlgorithmConfig,
    DittoConfig,
    FedAvgConfig,
    FedBNConfig,
    FedDynConfig,
    FedNovaConfig,
    FedOptConfig,
    FedPerConfig,
    FedProxConfig,
    FedRepConfig,
    MoonConfig,
    ScaffoldConfig,
)
from medfed.core.errors import ConfigError


def build_algorithm(cfg: AlgorithmConfig, model: nn.Module, num_sites: int, momentum: float = 0.0) -> Algorithm:
    """The algorithm object for a validated config, for ``model`` (its trainable and
    batch-norm names), a job of ``num_sites`` sites and local SGD ``momentum``."""
    trainable = trainable_keys(model)
    if isinstance(cfg, FedBNConfig):
        bn = norm_keys(model)
        if not bn:
            raise ConfigError(
                f"algorithm.name: 'fedbn' keeps batch-norm layers local, but model "
                f"'{type(model).__name__}' has none; choose another algorithm or model"
            )
        return FedBN(bn, trainable)
    if isinstance(cfg, FedAvgConfig):
        return FedAvg(trainable)
    if isinstance(cfg, FedProxConfig):
        return FedProx(cfg.mu, trainable)
    if isinstance(cfg, FedOptConfig):
        return FedOpt(cfg.name, cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau, trainable)
    if isinstance(cfg, MoonConfig):
        return Moon(cfg.mu, cfg.tau, trainable)
    if isinstance(cfg, DittoConfig):
        return Ditto(cfg.lam, trainable)
    if isinstance(cfg, FedRepConfig):
        return FedRep(layer_keys(model, cfg.personal_layers), cfg.head_epochs, trainable)
    if isinstance(cfg, FedPerConfig):
        return FedPer(layer_keys(model, cfg.personal_layers), trainable)
    if isinstance(cfg, FedNovaConfig):
        return FedNova(momentum, trainable)
    if isinstance(cfg, FedDynConfig):
        return FedDyn(cfg.alpha, num_sites, trainable)
    if isinstance(cfg, ScaffoldConfig):
        return Scaffold(cfg.server_lr, num_sites, trainable)
    raise TypeError(f"no algorithm for config {type(cfg).__name__}")


__all__ = ["Algorithm", "SiteHook", "build_algorithm"]
