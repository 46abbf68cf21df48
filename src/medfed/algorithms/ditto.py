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

from medfed.algorithms.base import Combiner, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.core.types import Params


class DittoHook(SiteHook):
    def __init__(self, lam: float):
        self.lam = lam
        self.personal: Params | None = None

    def personal_objective(self) -> tuple[Params | None, float] | None:
        return self.personal, self.lam

    def keep_personal(self, params: Params) -> None:
        self.personal = params


class Ditto(FedAvg):
    name = "ditto"
    personal_models = True

    def __init__(self, lam: float, trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.lam = lam

    def make_site_hook(self) -> SiteHook:
        return DittoHook(self.lam)
