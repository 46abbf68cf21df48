"""FedAvg (McMahan et al., 2017): the example-weighted mean of the sites' parameters."""

from __future__ import annotations

from collections.abc import Sequence

from medfed.algorithms.base import Algorithm
from medfed.algorithms.mean import weighted_average  # noqa: F401 (FedAvg's rule, imported from here by others)
from medfed.core.types import Params, Update


class FedAvg(Algorithm):
    name = "fedavg"

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        """The weighted mean of what the sites sent (or what the job's combiner makes of
        it); entries they keep local (``local_keys``) keep the server's value, so the global
        state dict always has every name."""
        shared = self.combiner.combine(global_params, updates, updates[0].round)
        return {k: shared.get(k, v) for k, v in global_params.items()}
