"""SecAgg+'s communication graph: which sites of a round agree pairwise masks and hold each
other's key shares (Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020).

The complete graph of Bonawitz et al. costs every site O(n) key agreements, shares and
mask streams per round. SecAgg+ connects each site only to ``k = O(log n)`` neighbours:
here the Harary graph H(n, k) (k even: the sites on a cycle, each joined to the k/2 nearest
on either side) over a seeded random permutation of the round's sites, as in the paper.
Pairwise masks and Shamir shares travel only along its edges; a site's secrets are shared
among its *closed neighbourhood* (its k neighbours and itself, k + 1 holders) with
threshold t, so t of those shares reconstruct them. ``k >= n - 1`` is the complete graph.

The permutation orders the sites by ``SHA-256(seed | name)`` with ``seed = SHA-256(JSON
["medfed-secagg-graph-v1", job_id, round, sorted sites])``: the job id (the job's hash,
which covers its seed), the round and the round's drawn sites fix the graph, so every site
recomputes it and refuses a neighbour list the server made up.

Failure bounds for k and t, with m of the n sites removed (dropped, or colluding with the
server) uniformly at random with respect to the permutation -- a site's k neighbours are
then a uniform k-subset of the other n - 1 sites, so the removed among them follow a
hypergeometric law Hyp(n - 1, m, k):

- :func:`p_lacking` (correctness): some site's neighbourhood lacks t survivors; a union
  bound over the n sites, ``n * P[Hyp(n - 1, m, k) >= k - t + 1]`` (a dropped site's
  secrets need t of its k neighbours: at most k - t of them may be gone).
- :func:`p_disconnected` (privacy): the graph of the remaining sites is disconnected, so
  the server would learn the sums of its parts. In H(n, k) that happens exactly when two
  runs of >= k/2 consecutive positions of the cycle are all removed; a union bound over
  the ``n (n - k + 1) / 2`` pairs of disjoint runs gives ``n (n - k + 1) / 2 *
  prod_{i<k} (m - i) / (n - i)``, 0 when m < k (H(n, k) is k-connected).

:func:`choose_neighbours` takes the smallest even k with ``p_disconnected <= 2^-40`` (the
statistical security parameter sigma = 40 of the paper's analysis) and ``p_lacking <=
2^-20`` (its correctness parameter eta = 20) for m = floor(dropout * n), else n - 1.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from medfed.privacy.secagg.messages import SecAggError

SECURITY_BITS = 40  # sigma: P(the remaining graph is disconnected) <= 2^-40
CORRECTNESS_BITS = 20  # eta: P(some neighbourhood lacks t survivors) <= 2^-20
DEFAULT_DROPOUT = 0.1  # the share of a round's sites that may drop, when not set


@dataclass(frozen=True)
class Graph:
    """An undirected graph over a round's sites: ``neighbours[v]`` excludes v itself.
    ``degree`` is the k it was built with (``>= len(sites) - 1``: complete)."""

    sites: tuple[str, ...]
    degree: int
    neighbours: Mapping[str, frozenset[str]]

    @property
    def complete(self) -> bool:
        return self.degree >= len(self.sites) - 1

    def closed(self, site: str) -> frozenset[str]:
        """``site`` and its neighbours: the holders of its key shares."""
        return self.neighbours[site] | {site}


def graph_seed(job_id: str, rnd: int, sites: Iterable[str]) -> bytes:
    """The 32-byte seed of round ``rnd``'s permutation (see the module docstring)."""
    return hashlib.sha256(json.dumps(["medfed-secagg-graph-v1", job_id, rnd, sorted(sites)]).encode()).digest()


def harary_graph(sites: Iterable[str], k: int, seed: bytes) -> Graph:
    """H(n, k) over ``sites`` in the order of ``SHA-256(seed | name)``: each site joined to
    the k/2 sites before and after it on the cycle. ``k`` even and in [2, n - 2], or
    ``k >= n - 1`` (the complete graph). SecAggError on a bad ``k`` or a repeated site."""
    names = sorted(sites)
    n = len(names)
    if len(set(names)) != n:
        raise SecAggError(f"graph: a site is listed twice in {names}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SecAggError(f"neighbours: expected an integer >= 1, got {k!r}")
    if k >= n - 1:
        return Graph(tuple(names), k, {v: frozenset(names) - {v} for v in names})
    if k % 2:
        raise SecAggError(f"neighbours: a Harary graph of {n} sites needs an even degree below {n - 1}, got {k}")
    order = sorted(names, key=lambda v: (hashlib.sha256(seed + v.encode()).digest(), v))
    half = k // 2
    nb = {v: frozenset(order[(i + j) % n] for j in range(-half, half + 1) if j) for i, v in enumerate(order)}
    return Graph(tuple(names), k, nb)


def round_graph(sites: Iterable[str], k: int, job_id: str, rnd: int) -> Graph:
    """The graph of round ``rnd`` of job ``job_id`` over its drawn ``sites``, degree ``k``."""
    names = sorted(sites)
    return harary_graph(names, k, graph_seed(job_id, rnd, names))


def neighbourhood_threshold(k: int) -> int:
    """The default threshold within a closed neighbourhood of k + 1 sites: a majority,
    ``(k + 1) // 2 + 1`` (for k = n - 1 the complete graph's ``n // 2 + 1``)."""
    return (k + 1) // 2 + 1


# --- failure bounds ----------------------------------------------------------------------------


def _hyper_tail(total: int, marked: int, draws: int, at_least: int) -> Fraction:
    """P[X >= at_least] for X ~ Hyp(total, marked, draws), exactly."""
    den = math.comb(total, draws)
    lo, hi = max(at_least, 0), min(draws, marked)
    return Fraction(sum(math.comb(marked, x) * math.comb(total - marked, draws - x) for x in range(lo, hi + 1)), den)


def p_lacking(n: int, k: int, t: int, removed: int) -> float:
    """Upper bound on P(some site's neighbourhood keeps fewer than t shareholders) when
    ``removed`` of the ``n`` sites drop (module docstring); 0 for the complete graph when
    ``n - removed >= t``."""
    k = min(k, n - 1)
    bound = n * _hyper_tail(n - 1, min(removed, n - 1), k, k - t + 1)
    return float(min(bound, Fraction(1)))


def p_disconnected(n: int, k: int, removed: int) -> float:
    """Upper bound on P(H(n, k) minus ``removed`` random sites is disconnected)."""
    if k >= n - 1 or removed < k:
        return 0.0
    prob = Fraction(1)
    for i in range(k):
        prob *= Fraction(removed - i, n - i)
    return float(min(Fraction(n * (n - k + 1), 2) * prob, Fraction(1)))


def choose_neighbours(n: int, dropout: float = DEFAULT_DROPOUT, threshold: int | None = None) -> int:
    """The smallest even k (>= ``threshold - 1``) whose bounds for ``m = floor(dropout * n)``
    removed sites meet ``2^-SECURITY_BITS`` and ``2^-CORRECTNESS_BITS``, with t =
    ``threshold`` or :func:`neighbourhood_threshold`; ``n - 1`` (complete) when none does."""
    m = math.floor(dropout * n)
    low = 2 if threshold is None else max(2, threshold - 1)
    for k in range(low + low % 2, n - 1, 2):
        t = neighbourhood_threshold(k) if threshold is None else threshold
        if p_disconnected(n, k, m) <= 2.0**-SECURITY_BITS and p_lacking(n, k, t, m) <= 2.0**-CORRECTNESS_BITS:
            return k
    return n - 1
