"""FedPer (Arivazhagan et al., 2019): a shared body and a personal head per site.

The layers named in ``personal_layers`` stay at each site exactly like FedBN's batch-norm
layers (``local_keys``): never sent, never overwritten, used when the site evaluates. The
body is averaged as in FedAvg. The federated arm's metrics are therefore those of each
site's personalized model (shared body + its own head) on its own data.
"""

from __future__ import annotations

from torch import nn

from medfed.algorithms.base import Combiner
from medfed.algorithms.fedavg import FedAvg
from medfed.core.errors import ConfigError


def layer_keys(model: nn.Module, layers: list[str]) -> frozenset[str]:
    """State-dict names under the named modules; an unknown name is a ConfigError."""
    modules = dict(model.named_modules())
    keys: set[str] = set()
    for layer in layers:
        if layer not in modules or not layer:
            top = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(
                f"algorithm.personal_layers: '{layer}' is not a layer of model '{type(model).__name__}' "
                f"(its top-level layers: {top})"
            )
        keys.update(f"{layer}.{k}" for k in modules[layer].state_dict())
    if not keys:
        raise ConfigError(f"algorithm.personal_layers: {layers} hold no parameters")
    return frozenset(keys)


class FedPer(FedAvg):
    name = "fedper"

    def __init__(self, personal_keys: frozenset[str], trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.local_keys = personal_keys
