"""FedRep (Collins et al., ICML 2021): a shared representation, a personal head.

Like FedPer, the layers in ``personal_layers`` stay at each site (``local_keys``), but a
round's local training has two phases: first ``head_epochs`` epochs training only the
personal head with the body frozen, then ``train.local_epochs`` epochs training only the
body with the head frozen. Only the body is sent and averaged. Batch-norm statistics of
the body update in both phases (they are buffers, not trained parameters).
"""

from __future__ import annotations

from dataclasses import replace

from medfed.algorithms.base import Combiner, Phase, SiteHook
from medfed.algorithms.fedavg import FedAvg
from medfed.core.types import Params, TrainSettings


class FedRepHook(SiteHook):
    def __init__(self, head: frozenset[str], body: frozenset[str], head_epochs: int):
        self.head, self.body, self.head_epochs = head, body, head_epochs

    def phases(self, settings: TrainSettings, global_params: Params) -> list[Phase]:
        head_phase = replace(settings, local_epochs=self.head_epochs, seed=(settings.seed + 1) & 0x7FFFFFFF)
        return [Phase(head_phase, frozen=self.body), Phase(settings, frozen=self.head)]


class FedRep(FedAvg):
    name = "fedrep"

    def __init__(self, personal_keys: frozenset[str], head_epochs: int, trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.local_keys = personal_keys
        self.head_epochs = head_epochs

    def make_site_hook(self) -> SiteHook:
        return FedRepHook(self.local_keys & self.trainable, self.trainable - self.local_keys, self.head_epochs)
