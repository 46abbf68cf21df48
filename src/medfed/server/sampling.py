"""Which sites train in a round: all, a repeatable random draw, the drawn sites with the
highest losses, or an adaptive draw valued by the sites' losses (see SamplingConfig).

``method: adaptive`` is adaptive client sampling after the adaptive sampling of Active
Federated Learning (Goetz, Malik, Bui, Moon, Liu and Kumar, 2019), which uses
only what the server already receives with each update (the site's training loss) and
its number of training examples: site k is valued ``v_k = sqrt(n_k) * loss_k``; the
``exclude`` share of the valued sites with the lowest values is left out, the round's
valued places are drawn without replacement from the rest with chances proportional to
``exp(sharpness * v_k)``, and ``explore`` of the round's places are drawn uniformly from
all sites not yet chosen. A site that has not trained yet has no value: such sites take
the valued places first (in a seeded random order). The updates are then combined by the
job's rule as drawn (no reweighting by the chance of being drawn).

``method: unbiased`` draws with replacement by data weight over answer rate and gives the
combiner per-site coefficients: see server/unbiased.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from medfed.algorithms.base import SiteCoefficients
from medfed.config import Job
from medfed.core.types import Metric, Update
from medfed.server.unbiased import DEFAULT_MIN_RATE, UnbiasedDraw

_CANDIDATE_STREAM = 104_759  # the candidates of ``method: loss``, apart from the plain draw
_ADAPTIVE_STREAM = 104_773  # the draws of ``method: adaptive``
ADAPTIVE_DEFAULTS = {"exclude": 0.75, "sharpness": 1.0, "explore": 0.1}


class SiteSampler:
    """Draws ``job.sites_per_round`` of the training sites per round without replacement
    (held-out sites never train).

    ``sizes`` maps each site to its number of training examples (used by ``method:
    size``). The draw depends only on the job seed and the round number; with ``method:
    loss`` the choice among the drawn candidates, and with ``method: adaptive`` the chances,
    depend on the training losses the sampler was shown (:meth:`observe`), each site's
    last one (``sizes`` weigh them with ``adaptive``; without them every site counts 1).
    """

    def __init__(self, job: Job, sizes: dict[str, int] | None = None):
        self.names = list(job.training_sites)
        self.index = {n: i for i, n in enumerate(job.site_names)}
        self.k = job.sites_per_round
        self.seed = job.seed
        self.method = job.sampling.method
        self.candidates = min(len(self.names), job.sampling.candidates or 2 * self.k)
        self.losses: dict[str, float] = {}  # methods loss, adaptive: each site's training loss in its last round
        cfg = job.sampling
        self.exclude, self.sharpness, self.explore = (
            getattr(cfg, f) if getattr(cfg, f) is not None else d for f, d in ADAPTIVE_DEFAULTS.items())
        self.sizes = {n: float((sizes or {}).get(n, 1) or 1) for n in self.names}
        self.p: np.ndarray | None = None
        if job.sampling.method == "size" and self.k < len(self.names):
            if sizes is None or any(sizes.get(n, 0) <= 0 for n in self.names):
                raise ValueError("sampling by size needs every site's number of training examples")
            w = np.array([sizes[n] for n in self.names], dtype=np.float64)
            self.p = w / w.sum()
        self.unbiased: UnbiasedDraw | None = None
        if job.sampling.method == "unbiased":
            rate = job.sampling.min_rate if job.sampling.min_rate is not None else DEFAULT_MIN_RATE
            self.unbiased = UnbiasedDraw(self.names, sizes or {}, self.k, self.seed, rate)

    def select(self, rnd: int) -> list[tuple[int, str]]:
        """(job index, name) of the sites drawn for round ``rnd``, in job order."""
        if self.unbiased is not None:  # always drawn, with replacement (a site drawn twice trains once)
            return [(self.index[n], n) for n in self.unbiased.draw(rnd)]
        if self.k >= len(self.names):
            return [(self.index[n], n) for n in self.names]
        if self.method == "loss":
            return self._highest_losses(rnd)
        if self.method == "adaptive":
            return self._adaptive(rnd)
        rng = np.random.default_rng([self.seed, 104_729, rnd])
        chosen = np.sort(rng.choice(len(self.names), size=self.k, replace=False, p=self.p))
        return [(self.index[self.names[i]], self.names[i]) for i in chosen]

    def candidates_of(self, rnd: int) -> list[str]:
        """``method: loss``: the sites drawn (uniformly) to choose round ``rnd``'s from."""
        rng = np.random.default_rng([self.seed, _CANDIDATE_STREAM, rnd])
        drawn = np.sort(rng.choice(len(self.names), size=self.candidates, replace=False))
        return [self.names[i] for i in drawn]

    def considered(self, rnd: int) -> list[str]:
        """The sites round ``rnd`` chose among, for the record of who was chosen over whom:
        the candidates (``loss``), every training site (``adaptive``), none otherwise."""
        if self.k >= len(self.names):
            return []
        if self.method == "loss":
            return self.candidates_of(rnd)
        return list(self.names) if self.method == "adaptive" else []

    def values(self) -> dict[str, float]:
        """``method: adaptive``: each site's value ``sqrt(n_k) * loss_k``, for the sites
        with a recorded loss."""
        return {s: math.sqrt(self.sizes[s]) * self.losses[s] for s in self.names if s in self.losses}

    def _adaptive(self, rnd: int) -> list[tuple[int, str]]:
        rng = np.random.default_rng([self.seed, _ADAPTIVE_STREAM, rnd])
        n_explore = min(self.k, int(round(self.explore * self.k)))
        valued_places = self.k - n_explore
        values = self.values()
        unknown = [s for s in self.names if s not in values]
        chosen = [unknown[i] for i in rng.permutation(len(unknown))[:valued_places]]
        left = valued_places - len(chosen)
        if left > 0:  # every unknown site is in: draw the rest among the valued ones
            ranked = sorted(values, key=lambda s: (values[s], self.index[s]))  # lowest first
            keep = max(left, len(ranked) - int(math.floor(self.exclude * len(ranked))))
            pool = ranked[len(ranked) - keep:]
            v = np.array([values[s] for s in pool])
            w = np.maximum(np.exp(self.sharpness * (v - v.max())), 1e-300)  # none drops out by underflow
            picks = rng.choice(len(pool), size=left, replace=False, p=w / w.sum())
            chosen += [pool[i] for i in picks]
        rest = [s for s in self.names if s not in set(chosen)]
        chosen += [rest[i] for i in rng.choice(len(rest), size=self.k - len(chosen), replace=False)]
        return sorted((self.index[s], s) for s in chosen)

    def _highest_losses(self, rnd: int) -> list[tuple[int, str]]:
        def priority(site: str) -> tuple[float, int]:  # unknown loss first, then the highest; job order breaks ties
            loss = self.losses.get(site, math.inf)
            return (-loss, self.index[site])

        chosen = sorted(self.candidates_of(rnd), key=priority)[: self.k]
        return sorted(((self.index[s], s) for s in chosen))

    def observe(self, updates: Iterable[Update]) -> None:
        """Remember each site's training loss of this round (``method: loss``, ``adaptive``)."""
        for u in updates:
            loss = u.metrics.get(Metric.LOSS)
            if loss is not None and math.isfinite(loss):
                self.losses[u.site] = float(loss)

    def slots(self, rnd: int) -> list[tuple[str, int, float]]:
        """``method: unbiased``: (site, multiplicity, chance of one slot) per site drawn for
        round ``rnd`` (after :meth:`select`); empty for the other methods."""
        u = self.unbiased
        return [] if u is None else [(s, m, u.chance[rnd][s]) for s, m in u.draw(rnd).items()]

    def observe_answers(self, rnd: int, updates: Sequence[Update]) -> list[tuple[str, bool, int | None]]:
        """``method: unbiased``: count who of round ``rnd``'s drawn sites answered (their
        answer rates weigh the next draws); (site, answered, steps) per drawn site. Empty
        for the other methods."""
        return [] if self.unbiased is None else self.unbiased.observe(rnd, updates)

    def coefficients(self, rnd: int, updates: Sequence[Update]) -> SiteCoefficients | None:
        """``method: unbiased``: the combiner's per-site coefficients of round ``rnd``
        (after :meth:`observe_answers`); None for the other methods (the job's own weights)."""
        return None if self.unbiased is None else self.unbiased.coefficients(rnd, updates)

    def replay(self, records: Iterable[Mapping]) -> None:
        """``method: unbiased``: rebuild its draws and counts from a stopped run's records."""
        if self.unbiased is not None:
            self.unbiased.replay(records)

    def observe_losses(self, losses: dict[str, float]) -> None:
        """Remember recorded training losses (a resumed run: the last one of each site)."""
        self.losses.update({s: float(v) for s, v in losses.items() if v is not None and math.isfinite(v)})
