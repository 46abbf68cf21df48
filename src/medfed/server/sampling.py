"""Which sites train in a round: all, a repeatable random draw, or the drawn sites with
the highest losses (see SamplingConfig)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from medfed.config import Job
from medfed.core.types import Metric, Update

_CANDIDATE_STREAM = 104_759  # the candidates of ``method: loss``, apart from the plain draw


class SiteSampler:
    """Draws ``job.sites_per_round`` of the training sites per round without replacement
    (held-out sites never train).

    ``sizes`` maps each site to its number of training examples (used by ``method:
    size``). The draw depends only on the job seed and the round number; with ``method:
    loss`` the choice among the drawn candidates depends on the training losses the
    sampler was shown (:meth:`observe`), each site's last one.
    """

    def __init__(self, job: Job, sizes: dict[str, int] | None = None):
        self.names = list(job.training_sites)
        self.index = {n: i for i, n in enumerate(job.site_names)}
        self.k = job.sites_per_round
        self.seed = job.seed
        self.method = job.sampling.method
        self.candidates = min(len(self.names), job.sampling.candidates or 2 * self.k)
        self.losses: dict[str, float] = {}  # method loss: each site's training loss in its last round
        self.p: np.ndarray | None = None
        if job.sampling.method == "size" and self.k < len(self.names):
            if sizes is None or any(sizes.get(n, 0) <= 0 for n in self.names):
                raise ValueError("sampling by size needs every site's number of training examples")
            w = np.array([sizes[n] for n in self.names], dtype=np.float64)
            self.p = w / w.sum()

    def select(self, rnd: int) -> list[tuple[int, str]]:
        """(job index, name) of the sites drawn for round ``rnd``, in job order."""
        if self.k >= len(self.names):
            return [(self.index[n], n) for n in self.names]
        if self.method == "loss":
            return self._highest_losses(rnd)
        rng = np.random.default_rng([self.seed, 104_729, rnd])
        chosen = np.sort(rng.choice(len(self.names), size=self.k, replace=False, p=self.p))
        return [(self.index[self.names[i]], self.names[i]) for i in chosen]

    def candidates_of(self, rnd: int) -> list[str]:
        """``method: loss``: the sites drawn (uniformly) to choose round ``rnd``'s from."""
        rng = np.random.default_rng([self.seed, _CANDIDATE_STREAM, rnd])
        drawn = np.sort(rng.choice(len(self.names), size=self.candidates, replace=False))
        return [self.names[i] for i in drawn]

    def _highest_losses(self, rnd: int) -> list[tuple[int, str]]:
        def priority(site: str) -> tuple[float, int]:  # unknown loss first, then the highest; job order breaks ties
            loss = self.losses.get(site, math.inf)
            return (-loss, self.index[site])

        chosen = sorted(self.candidates_of(rnd), key=priority)[: self.k]
        return sorted(((self.index[s], s) for s in chosen))

    def observe(self, updates: Iterable[Update]) -> None:
        """Remember each site's training loss of this round (``method: loss``)."""
        for u in updates:
            loss = u.metrics.get(Metric.LOSS)
            if loss is not None and math.isfinite(loss):
                self.losses[u.site] = float(loss)

    def observe_losses(self, losses: dict[str, float]) -> None:
        """Remember recorded training losses (a resumed run: the last one of each site)."""
        self.losses.update({s: float(v) for s, v in losses.items() if v is not None and math.isfinite(v)})
