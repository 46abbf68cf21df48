"""Shapley values and leave-one-out of a cooperative game, as pure functions over a utility.

Players are ``0 .. n-1``; a coalition is a ``frozenset`` of them; ``utility(S)`` is what
coalition ``S`` achieves (server/contribution.py: the validation metric of the model
rebuilt from ``S``'s updates). Each coalition's utility is asked for once (memoized), so the
number of evaluations is the cost.

* :func:`exact_shapley`: every coalition, ``2^n`` evaluations;
  ``phi_i = sum_{S not containing i} |S|! (n-|S|-1)! / n! * (U(S + i) - U(S))``.
* :func:`sampled_shapley`: the mean marginal gain of each player over ``samples`` random
  orders of the players (Castro et al., 2009), with a 95% normal confidence interval of the
  mean; an order stops evaluating once the players so far come closer than ``truncation``
  to ``U(N)`` (TMC/GTG-Shapley's within-round truncation), its later players' gains counted 0.
  Each order's gains sum to ``U(N) - U(empty)`` (within ``truncation``), so the estimate
  keeps efficiency whatever the sampling error.
* :func:`leave_one_out`: ``U(N) - U(N - i)``, ``n + 1`` evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Coalition = frozenset[int]
Utility = Callable[[Coalition], float]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Estimate:
    """Shapley values of players ``0 .. n-1``; ``halfwidths``: each value's 95% confidence
    half-width when sampled (None when exact); ``evaluations``: coalitions evaluated."""

    values: tuple[float, ...]
    halfwidths: tuple[float, ...] | None
    evaluations: int


class Memo:
    """``utility`` asked once per coalition; ``len()`` is the number of evaluations."""

    def __init__(self, utility: Utility):
        self.utility = utility
        self.known: dict[Coalition, float] = {}

    def __call__(self, coalition: Coalition) -> float:
        if coalition not in self.known:
            self.known[coalition] = float(self.utility(coalition))
        return self.known[coalition]

    def __len__(self) -> int:
        return len(self.known)


def exact_shapley(n: int, utility: Utility | Memo) -> Estimate:
    """The Shapley values of the ``n`` players, from all ``2^n`` coalitions."""
    u = utility if isinstance(utility, Memo) else Memo(utility)
    weight = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    values = [0.0] * n
    for mask in range(1 << n):
        members = frozenset(i for i in range(n) if mask >> i & 1)
        base = u(members)
        for i in range(n):
            if not mask >> i & 1:
                values[i] += weight[len(members)] * (u(members | {i}) - base)
    return Estimate(tuple(values), None, len(u))


def sampled_shapley(
    n: int, utility: Utility | Memo, samples: int, rng: np.random.Generator, truncation: float = 0.0
) -> Estimate:
    """Shapley values estimated from ``samples`` (>= 2) random orders of the ``n`` players,
    drawn from ``rng``, with 95% confidence half-widths; ``truncation`` >= 0 as in the
    module docstring (0: every step of every order is evaluated)."""
    if samples < 2:
        raise ValueError(f"sampled_shapley needs at least 2 samples for a confidence interval, got {samples}")
    u = utility if isinstance(utility, Memo) else Memo(utility)
    everyone = frozenset(range(n))
    empty, full = u(frozenset()), u(everyone)
    gains = np.zeros((samples, n))
    for m in range(samples):
        prefix: Coalition = frozenset()
        before = empty
        for k, i in enumerate(rng.permutation(n)):
            if k > 0 and abs(full - before) < truncation:
                break  # the rest of this order adds (almost) nothing: their gains stay 0
            prefix = prefix | {int(i)}
            now = u(prefix)
            gains[m, i] = now - before
            before = now
    values = gains.mean(axis=0)
    halfwidths = Z95 * gains.std(axis=0, ddof=1) / math.sqrt(samples)
    return Estimate(tuple(float(v) for v in values), tuple(float(h) for h in halfwidths), len(u))


def leave_one_out(n: int, utility: Utility | Memo) -> tuple[float, ...]:
    """Each player's ``U(N) - U(N without the player)``."""
    u = utility if isinstance(utility, Memo) else Memo(utility)
    everyone = frozenset(range(n))
    full = u(everyone)
    return tuple(full - u(everyone - {i}) for i in range(n))
