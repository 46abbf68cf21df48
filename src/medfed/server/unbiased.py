"""``sampling: {method: unbiased}``: a draw of the round's sites, and weights for their
updates, that correct for sites that answer less often than others (heterogeneous
communication) and for unequal local work (heterogeneous computation).

In the spirit of FedACS (Weng et al., 2025, which aims to remove the objective
inconsistency these two cause by how clients are sampled); this is medfed's own
derivation, not the paper's algorithm, which was not available to us.

With ``w_k = n_k / Σ n`` (training examples), ``p̂_k = max(min_rate, (answered_k + 1) /
(drawn_k + 2))`` (how often site k answered when drawn, smoothed) and ``τ_k`` its last
reported number of local steps:

1. **Draw.** ``K`` slots (the round's count), each drawn independently, with replacement,
   from ``π_k ∝ w_k / p̂_k`` with the generator of the job seed and the round. A site drawn
   in several slots trains once; its multiplicity ``m_k`` is kept.
2. **Why.** A slot holds site k and is answered with chance ``π_k p_k ∝ w_k`` (when
   ``p̂ = p``): the site of an answered slot is distributed as the data weights, and the
   mean over answered slots of ``d_k = (θ_k - θ) / τ_k`` (update per local step, as in
   FedNova) estimates ``Σ_k w_k d_k`` without the bias towards sites that answer more
   often or take more steps. Exactly so for one slot, and for several when each slot
   answers on its own; a site drawn in two slots answers for both at once, which leans the
   mean towards reliable sites when duplicates are common (many slots for few sites): with
   5 sites, 3 slots and one site answering 20% of the time (46% of the slots) the expected
   step is far from the target (tests/server/test_sampling_unbiased.py); with 50 equal
   sites, 5 or 15 slots and a third answering 40% of the time, that third's expected share
   of the aggregate is 0.334 against its 0.340 of the data (uniform draws: 0.168).
3. **Aggregate.** ``θ ← θ + τ̄ (1/M) Σ_{answered k} m_k (θ_k - θ) / τ_k`` with ``M = Σ_{answered}
   m_k`` and ``τ̄ = Σ_k w_k τ_k`` (the effective number of steps; a site not heard from yet
   counts with the median of the known ``τ``). Equal ``τ`` and every site answering give the
   multiplicity-weighted mean of the received models. Trainable entries only; the others
   (batch-norm statistics) take the multiplicity-weighted mean (algorithms/sampled_mean.py).
   ``τ_k`` is the plain count of optimizer steps, with or without momentum (FedNova's
   momentum-weighted count, algorithms/fednova.py, is not used here).
4. **Observe.** After the round each drawn site counts as drawn once, as answered once if
   its update arrived and was accepted, and its ``τ_k`` is its update's ``num_steps``. The
   run records, per drawn site, its multiplicity, its chance ``π_k`` and whether it answered
   (and its steps when it did), from which a resumed run rebuilds the counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from medfed.algorithms.base import SiteCoefficients
from medfed.core.types import Update

UNBIASED_STREAM = 104_779  # the slots of ``method: unbiased``, apart from the other draws
DEFAULT_MIN_RATE = 0.05
# what the run records per drawn site (arm federated, split train), and a resume replays
MULTIPLICITY, CHANCE, ANSWERED, STEPS = "multiplicity", "chance", "answered", "steps"


class UnbiasedDraw:
    """The state and draws of ``method: unbiased`` over the training sites ``names`` (job
    order) with training examples ``sizes``: ``k`` slots a round, seeded by ``seed``."""

    def __init__(self, names: Sequence[str], sizes: Mapping[str, float], k: int, seed: int,
                 min_rate: float = DEFAULT_MIN_RATE):
        if any(not sizes.get(n, 0) > 0 for n in names):
            raise ValueError("unbiased sampling weighs each site by its training examples and needs every site's")
        self.names, self.k, self.seed, self.min_rate = list(names), k, seed, min_rate
        total = float(sum(sizes[n] for n in self.names))
        self.w = np.array([sizes[n] / total for n in self.names], dtype=np.float64)
        self.drawn = {n: 0 for n in self.names}
        self.answered = {n: 0 for n in self.names}
        self.steps: dict[str, int] = {}  # each site's last reported number of local steps
        self.slots: dict[int, dict[str, int]] = {}  # round -> multiplicity of each drawn site (job order)
        self.chance: dict[int, dict[str, float]] = {}  # round -> π_k of each drawn site when drawn

    def rates(self) -> np.ndarray:
        """``p̂_k``: each site's smoothed answer rate when drawn, at least ``min_rate``."""
        a = np.array([self.answered[n] for n in self.names], dtype=np.float64)
        d = np.array([self.drawn[n] for n in self.names], dtype=np.float64)
        return np.maximum(self.min_rate, (a + 1.0) / (d + 2.0))

    def chances(self) -> np.ndarray:
        """``π_k ∝ w_k / p̂_k``: each site's chance of filling one slot."""
        pi = self.w / self.rates()
        return pi / pi.sum()

    def draw(self, rnd: int) -> dict[str, int]:
        """The sites of round ``rnd`` and how many slots each fills (job order); a round
        already drawn (or replayed from a stopped run's records) gives the same again."""
        if rnd not in self.slots:
            pi = self.chances()
            rng = np.random.default_rng([self.seed, UNBIASED_STREAM, rnd])
            counts = np.bincount(rng.choice(len(self.names), size=self.k, replace=True, p=pi),
                                 minlength=len(self.names))
            self.slots[rnd] = {self.names[i]: int(c) for i, c in enumerate(counts) if c}
            self.chance[rnd] = {self.names[i]: float(pi[i]) for i, c in enumerate(counts) if c}
        return self.slots[rnd]

    def observe(self, rnd: int, updates: Iterable[Update]) -> list[tuple[str, bool, int | None]]:
        """Count round ``rnd``'s drawn sites as drawn, those with an accepted update as
        answered, and remember their steps; return (site, answered, steps) per drawn site."""
        got = {u.site: u for u in updates}
        out = []
        for site in self.slots[rnd]:
            u = got.get(site)
            self.drawn[site] += 1
            if u is not None:
                self.answered[site] += 1
                self.steps[site] = int(u.num_steps)
            out.append((site, u is not None, None if u is None else int(u.num_steps)))
        return out

    def mean_steps(self) -> float:
        """``τ̄ = Σ_k w_k τ_k``; a site with no reported steps counts with the median of the
        known ones (1 when none is known)."""
        known = [self.steps[n] for n in self.names if n in self.steps]
        fill = float(np.median(known)) if known else 1.0
        tau = np.array([float(self.steps.get(n, fill)) for n in self.names])
        return float(self.w @ tau)

    def coefficients(self, rnd: int, updates: Sequence[Update]) -> SiteCoefficients:
        """Round ``rnd``'s coefficients for its answering sites (after :meth:`observe`):
        ``step[k] = τ̄ m_k / (M τ_k)``, ``mean[k] = m_k / M``. A site that took no step
        (its model is the global one) counts one step."""
        m = self.slots[rnd]
        total = sum(m[u.site] for u in updates)
        tau_bar = self.mean_steps()
        step = {u.site: tau_bar * m[u.site] / (total * max(1, u.num_steps)) for u in updates}
        return SiteCoefficients(rnd, step, {u.site: m[u.site] / total for u in updates})

    def replay(self, records: Iterable[Mapping]) -> None:
        """Rebuild the draws, counts and steps from a stopped run's records (metrics.jsonl
        rows of the federated arm, in the order written; rounds in order)."""
        mine = [r for r in records if r.get("arm") == "federated" and r.get("split") == "train"
                and r.get("metric") in (MULTIPLICITY, ANSWERED, STEPS) and r.get("site") in self.drawn]
        for r in sorted(mine, key=lambda r: int(r["round"])):  # stable: within a round as written
            site, rnd, value = r["site"], int(r["round"]), r["value"]
            if r["metric"] == MULTIPLICITY:
                self.slots.setdefault(rnd, {})[site] = int(value)
            elif r["metric"] == ANSWERED:
                self.drawn[site] += 1
                self.answered[site] += int(value == 1.0)
            elif value is not None and math.isfinite(value):
                self.steps[site] = int(value)
        for rnd, m in self.slots.items():  # the draws in job order, as drawn
            self.slots[rnd] = {n: m[n] for n in self.names if n in m}
