"""Federated algorithms: each file holds a site hook and a server rule (see base.py)."""

from __future__ import annotations

from torch import nn

from medfed.algorithms.base import Algorithm, Combiner, SiteHook, WeightedMean, norm_keys, trainable_keys
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
from medfed.algorithms.fedce import FedCE
from medfed.algorithms.harmofl import HarmoFL
from medfed.algorithms.qfedavg import QFedAvg
from medfed.algorithms.scaffold import Scaffold
from medfed.config import (
    AlgorithmConfig,
    DittoConfig,
    FedAvgConfig,
    FedBNConfig,
    FedCEConfig,
    FedDynConfig,
    FedNovaConfig,
    FedOptConfig,
    FedPerConfig,
    FedProxConfig,
    FedRepConfig,
    HarmoFLConfig,
    MoonConfig,
    QFedAvgConfig,
    ScaffoldConfig,
)
from medfed.core.errors import ConfigError


def build_algorithm(
    cfg: AlgorithmConfig, model: nn.Module, num_sites: int, momentum: float = 0.0, combiner: Combiner | None = None,
    lr: float | None = None,
) -> Algorithm:
    """The algorithm object for a validated config, for ``model`` (its trainable and
    batch-norm names), a job of ``num_sites`` sites, local SGD ``momentum`` and learning
    rate ``lr`` (q-FedAvg's default ``L = 1 / lr``; the server passes it, a site need not).
    ``combiner``: how the rules built on the mean combine the updates (default: the
    weighted mean); the job's validation lets a robust rule, DP or secure aggregation
    through only for those (FedAvg's family and the server optimizers)."""
    trainable = trainable_keys(model)
    kept = local_keys(cfg, model)
    if isinstance(cfg, FedBNConfig):
        if not kept:
            raise ConfigError(
                f"algorithm.name: 'fedbn' keeps batch-norm layers local, but model "
                f"'{type(model).__name__}' has none; choose another algorithm or model"
            )
        return FedBN(kept, trainable, combiner)
    if isinstance(cfg, FedAvgConfig):
        return FedAvg(trainable, combiner)
    if isinstance(cfg, FedProxConfig):
        return FedProx(cfg.mu, trainable, combiner)
    if isinstance(cfg, FedOptConfig):
        return FedOpt(cfg.name, cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau, trainable, combiner)
    if isinstance(cfg, MoonConfig):
        return Moon(cfg.mu, cfg.tau, trainable, combiner)
    if isinstance(cfg, DittoConfig):
        return Ditto(cfg.lam, trainable, combiner)
    if isinstance(cfg, FedRepConfig):
        return FedRep(kept, cfg.head_epochs, trainable, combiner)
    if isinstance(cfg, FedPerConfig):
        return FedPer(kept, trainable, combiner)
    if isinstance(cfg, HarmoFLConfig):
        return HarmoFL(cfg.alpha, trainable, combiner)
    if combiner is not None and not isinstance(combiner, WeightedMean):
        raise TypeError(f"{type(cfg).__name__}: its rule is not built on the mean and takes no combiner")
    if isinstance(cfg, FedNovaConfig):
        return FedNova(momentum, trainable)
    if isinstance(cfg, FedDynConfig):
        return FedDyn(cfg.alpha, num_sites, trainable)
    if isinstance(cfg, ScaffoldConfig):
        return Scaffold(cfg.server_lr, num_sites, trainable)
    if isinstance(cfg, QFedAvgConfig):
        lipschitz = cfg.lipschitz if cfg.lipschitz is not None else (1.0 / lr if lr else None)
        return QFedAvg(cfg.q, lipschitz, trainable)
    if isinstance(cfg, FedCEConfig):
        return FedCE(cfg.mode, trainable)
    raise TypeError(f"no algorithm for config {type(cfg).__name__}")


def local_keys(cfg: AlgorithmConfig, model: nn.Module) -> frozenset[str]:
    """The state-dict entries of ``model`` that the algorithm keeps at each site (never
    sent, never overwritten): FedBN's batch-norm layers, FedPer's and FedRep's personal
    layers; none for the others."""
    if isinstance(cfg, FedBNConfig):
        return norm_keys(model)
    if isinstance(cfg, (FedPerConfig, FedRepConfig)):
        return layer_keys(model, cfg.personal_layers)
    return frozenset()


__all__ = ["Algorithm", "Combiner", "SiteHook", "build_algorithm", "local_keys"]
