"""Privacy accounting: epsilon after every round, computed with Opacus' accountants.

One round composes ``steps_per_round`` runs of the sampled Gaussian mechanism with noise
multiplier ``z`` and sampling rate ``q``:

* site-level DP-FedAvg (McMahan et al., ICLR 2018): one step per round, ``q`` = the
  share of sites drawn in a round;
* sample-level DP-SGD at a site (Abadi et al., CCS 2016): one step per local batch,
  ``q`` = the batch's Poisson sampling rate.

The composition is Opacus' (RDP: Mironov 2017, Mironov et al. 2019, converted to
(epsilon, delta) with Balle et al. 2020; PRV: Gopi et al. 2021), never written here again.
Adaptive clipping's split of the budget (Andrew et al., NeurIPS 2021) is
:func:`adaptive_noise_multiplier`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACCOUNTANTS = ("rdp", "prv")


def _check(noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int, delta: float) -> None:
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier: must be a finite number > 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate: must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta}")
    if int(steps_per_round) != steps_per_round or steps_per_round < 1:
        raise ValueError(f"steps_per_round: must be an integer >= 1, got {steps_per_round}")
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds: must be an integer >= 1, got {rounds}")


def epsilon_schedule(
    noise_multiplier: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> list[float]:
    """Epsilon spent after each round 1..``rounds`` (a list of ``rounds`` floats, >= 0).

    Each round is ``steps_per_round`` compositions of the sampled Gaussian mechanism with
    ``noise_multiplier`` (noise std over L2 sensitivity) and ``sample_rate`` in (0, 1].
    ``delta`` in (0, 1) is the target delta.

    ``accountant="rdp"`` (default): Opacus' RDP analysis over its default orders
    (``RDPAccountant.DEFAULT_ALPHAS``); RDP adds up over steps, so the per-step RDP is
    computed once and scaled; the result equals a stepped ``RDPAccountant``.
    ``accountant="prv"``: Opacus' ``PRVAccountant`` (tighter, slower: one numerical
    composition per round), stepped round by round and read as its upper bound.

    Raises ValueError naming the argument that is out of range.
    """
    _check(noise_multiplier, sample_rate, steps_per_round, rounds, delta)
    if accountant == "rdp":
        return _rdp_schedule(noise_multiplier, sample_rate, int(steps_per_round), int(rounds), delta)
    if accountant == "prv":
        return _prv_schedule(noise_multiplier, sample_rate, int(steps_per_round), int(rounds), delta)
    raise ValueError(f"accountant: must be one of {list(ACCOUNTANTS)}, got {accountant!r}")


def _rdp_schedule(z: float, q: float, steps_per_round: int, rounds: int, delta: float) -> list[float]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    per_step = rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders)
    out = []
    for r in range(1, rounds + 1):
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=per_step * (steps_per_round * r), delta=delta)
        # the RDP -> (eps, delta) bound can dip below 0 for delta near 1; (0, delta)-DP holds then
        out.append(max(0.0, float(eps)))
    return out


def _prv_schedule(z: float, q: float, steps_per_round: int, rounds: int, delta: float) -> list[float]:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    out = []
    # Opacus' PRV takes log(0) where q = 1 and masks the result; hide the harmless warning
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(rounds):
            for _ in range(steps_per_round):
                acc.step(noise_multiplier=z, sample_rate=q)
            out.append(max(0.0, float(acc.get_epsilon(delta))))
    return out


def rounds_within(schedule: list[float], max_epsilon: float) -> int:
    """How many leading rounds of ``schedule`` (epsilon after rounds 1, 2, ...) keep
    epsilon <= ``max_epsilon`` (> 0). Counting stops at the first round over the budget,
    so every round it allows is within it."""
    if not max_epsilon > 0:
        raise ValueError(f"max_epsilon: must be > 0, got {max_epsilon}")
    n = 0
    for eps in schedule:
        if not eps <= max_epsilon:  # NaN counts as over the budget
            break
        n += 1
    return n


def adaptive_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The noise multiplier ``z_delta`` for the clipped updates when adaptive clipping also
    releases a noisy count of unclipped updates with std ``count_noise_multiplier``
    (``sigma_b``, in updates).

    ``z_delta = (z**-2 - (2 * sigma_b)**-2) ** -0.5``: the two releases together cost
    exactly what one Gaussian mechanism with multiplier ``z`` costs (Andrew et al.,
    "Differentially private learning with adaptive clipping", NeurIPS 2021, Thm. 1), so
    the accountant keeps using ``z``. Needs ``2 * sigma_b > z``.
    """
    z, sigma_b = noise_multiplier, count_noise_multiplier
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"noise_multiplier: must be a finite number > 0, got {z}")
    if not sigma_b > 0:
        raise ValueError(f"count_noise_multiplier: must be > 0, got {sigma_b}")
    if not 2 * sigma_b > z:
        raise ValueError(
            f"count_noise_multiplier: the count's noise ({sigma_b:g}) would spend the whole budget of "
            f"noise_multiplier {z:g}; it must be > noise_multiplier / 2 = {z / 2:g}. Raise count_noise_multiplier"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


@dataclass(frozen=True)
class PrivacyLedger:
    """What a run spends: ``schedule[r - 1 + released_again]`` is epsilon after round ``r``
    at ``delta``; ``max_epsilon`` the budget (None: no budget, every scheduled round is
    allowed); ``what`` says which guarantee it is, e.g. ``"site-level, central noise"``.

    ``released_again``: rounds whose release happened twice (a deployed run resumed after
    a crash redoes the round it was in; whatever left a site or the server in the first
    attempt was released all the same), each counted as one more round of the
    composition, before the run's own rounds. ``schedule`` holds the rounds of the run plus
    those."""

    schedule: list[float]
    delta: float
    max_epsilon: float | None
    what: str
    released_again: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"delta: must be in (0, 1), got {self.delta}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ValueError(f"max_epsilon: must be > 0 or None, got {self.max_epsilon}")

    def epsilon(self, rnd: int) -> float:
        """Epsilon spent after round ``rnd`` (counted from 1), releases made again included."""
        rounds = len(self.schedule) - self.released_again
        if not 1 <= rnd <= rounds:
            raise ValueError(f"round: must be in 1..{rounds}, got {rnd}")
        return self.schedule[rnd - 1 + self.released_again]

    @property
    def last_round(self) -> int:
        """The last round the budget allows (0: not even the first)."""
        rounds = len(self.schedule) - self.released_again
        if self.max_epsilon is None:
            return rounds
        return max(0, rounds_within(self.schedule, self.max_epsilon) - self.released_again)

    def allowed(self, rnd: int) -> bool:
        """Whether round ``rnd`` (from 1) can run without passing the budget."""
        return 1 <= rnd <= self.last_round
