"""Ditto (Li et al., ICML 2021): a global model and, at each site, a personal model.

The global model is trained and averaged exactly as in FedAvg. After its local training
each round, a site also trains its personal model ``v_i`` on its own data with the same
settings plus the proximal pull ``lam/2 * ||v_i - w_global||^2`` towards the global
model it received; ``v_i`` starts from the global model in the site's first round and
never leaves the site. The personal models are evaluated on each site's own data and
reported as the ``personalized`` arm, next to the global model. Each round costs a site
two local trainings.
"""

from __future__ import annotations

from medfed.algorithms.base import Combiner, Phase, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.algorithms.fedprox import ProximalHook
from medfed.core.types import Params, TrainSettings


class DittoHook(SiteHook):
    """The global model's training, then the personal model's: from the site's personal
    model (the global model in its first round), with the proximal pull towards the global
    model received, the same settings; the result stays at the site."""

    state_fields = ("personal",)  # the personal model

    def __init__(self, lam: float):
        self.lam = lam
        self.personal: Params | None = None

    def phases(self, settings: TrainSettings, global_params: Params) -> list[Phase]:
        start = self.personal if self.personal is not None else global_params
        return [Phase(settings),
                Phase(settings, start=start, hook=ProximalHook(self.lam, global_params), keep=self._keep)]

    def _keep(self, params: Params) -> None:
        self.personal = params

    def personal_model(self) -> Params | None:
        return self.personal


class Ditto(FedAvg):
    name = "ditto"
    personal_models = True

    def __init__(self, lam: float, trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.lam = lam

    def make_site_hook(self) -> SiteHook:
        return DittoHook(self.lam)
