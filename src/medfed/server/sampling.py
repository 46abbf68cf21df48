"""Which sites train in a round: all, or a repeatable random draw (see SamplingConfig)."""

from __future__ import annotations

import numpy as np

from medfed.config import Job


class SiteSampler:
    """Draws ``job.sites_per_round`` of the training sites per round without replacement
    (held-out sites never train).

    ``sizes`` maps each site to its number of training examples (used by ``method:
    size``). The draw depends only on the job seed and the round number.
    """

    def __init__(self, job: Job, sizes: dict[str, int] | None = None):
        self.names = list(job.training_sites)
        self.index = {n: i for i, n in enumerate(job.site_names)}
        self.k = job.sites_per_round
        self.seed = job.seed
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
        rng = np.random.default_rng([self.seed, 104_729, rnd])
        chosen = np.sort(rng.choice(len(self.names), size=self.k, replace=False, p=self.p))
        return [(self.index[self.names[i]], self.names[i]) for i in chosen]
