"""Robust aggregation rules: :class:`~medfed.algorithms.base.Combiner` subclasses that
bound what faulty or malicious sites can do to the global model.

Every rule works on the sites' *deltas* to the global model (floating-point entries only,
see core/params.py) and returns full values with exactly the names the updates carry.
Integer buffers (batch-norm ``num_batches_tracked``) are counters, not parameters: they
get the example-weighted mean of FedAvg.

Coordinate-wise rules go one tensor name at a time (stack the m deltas of one tensor,
reduce, drop), so peak memory is about m copies of the largest tensor, not of the model.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from medfed.algorithms.base import Combiner
from medfed.algorithms.mean import weighted_average
from medfed.core.errors import RoundError
from medfed.core.params import apply_delta, clip_to_norm, delta, float_names
from medfed.core.types import Metric, Params, Update

log = logging.getLogger("medfed")


# ---------------------------------------------------------------- shared helpers


def _check_updates(rule: str, updates: Sequence[Update]) -> None:
    """Every update must carry the names of the first one (the combiner's contract)."""
    if not updates:
        raise RoundError(f"{rule}: no updates to combine")
    names = set(updates[0].params)
    for u in updates[1:]:
        if set(u.params) != names:  # the order may differ: a payload's is not the model's
            missing = sorted(set(names) - set(u.params))[:3]
            extra = sorted(set(u.params) - set(names))[:3]
            raise RoundError(
                f"{rule}: site '{u.site}' sent other tensor names than site '{updates[0].site}' "
                f"(missing {missing}, unexpected {extra})"
            )


def _stacked_delta(global_params: Params, updates: Sequence[Update], name: str) -> torch.Tensor:
    """The m deltas of one tensor, stacked: shape (m, *shape), float32 (float64 stays)."""
    ref = {name: global_params[name]}
    first = delta({name: updates[0].params[name]}, ref)[name]
    out = torch.empty((len(updates), *first.shape), dtype=first.dtype)
    out[0] = first
    for i, u in enumerate(updates[1:], start=1):
        out[i] = delta({name: u.params[name]}, ref)[name]
    return out


def _finish(global_params: Params, updates: Sequence[Update], combined: Params) -> Params:
    """Global + combined delta, plus the example-weighted mean of the integer entries,
    in the updates' name order."""
    names = list(updates[0].params)
    int_names = [k for k in names if not updates[0].params[k].is_floating_point()]
    full: Params = {}
    if int_names:
        full = weighted_average(
            [{k: u.params[k] for k in int_names} for u in updates], [u.num_examples for u in updates]
        )
    out = apply_delta(global_params, combined, full=full)
    return {k: out[k] for k in names}


def _reduce_deltas(
    global_params: Params, updates: Sequence[Update], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> Params:
    """The combined delta: ``reduce`` ((m, *shape) -> shape) applied to the stacked deltas
    of every floating-point tensor, one name at a time."""
    return {
        name: reduce(_stacked_delta(global_params, updates, name)) for name in float_names(updates[0].params)
    }


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# ---------------------------------------------------------------- the rules


def _median(stacked: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median over dim 0; for even m the mean of the two middle values
    (``torch.median`` would return the lower one, biasing the result)."""
    m = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if m % 2:
        return ordered[m // 2]
    return 0.5 * ordered[m // 2 - 1] + 0.5 * ordered[m // 2]  # halves first: no overflow


class CoordinateMedian(Combiner):
    """Coordinate-wise median of the sites' deltas (Yin et al., 2018). Unweighted: a site's
    example count cannot buy it influence."""

    name = "median"

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        _check_updates(self.name, updates)
        return _finish(global_params, updates, _reduce_deltas(global_params, updates, _median))


class TrimmedMean(Combiner):
    """Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate drop the
    b = floor(trim * m) largest and b smallest deltas and average the rest. Unweighted.

    ``trim``: the share of updates dropped at each end, in [0, 0.5); it tolerates up to
    b faulty sites per coordinate.
    """

    name = "trimmed_mean"

    def __init__(self, trim: float):
        if not _is_real(trim) or not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
        self.trim = float(trim)

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        _check_updates(self.name, updates)
        m = len(updates)
        b = math.floor(self.trim * m)
        if m - 2 * b < 1:
            # unreachable while trim < 0.5; kept so a changed bound cannot divide by zero
            raise RoundError(f"{self.name}: trim={self.trim} drops all of the m={m} updates")

        def reduce(stacked: torch.Tensor) -> torch.Tensor:
            # sort, then slice: subtracting the extremes from a sum would cancel honest
            # values against huge malicious ones
            return stacked.sort(dim=0).values[b : m - b].mean(dim=0)

        return _finish(global_params, updates, _reduce_deltas(global_params, updates, reduce))


class Krum(Combiner):
    """Krum and Multi-Krum (Blanchard et al., 2017).

    Update i scores the sum of squared L2 distances (whole model delta) to its
    m - f - 2 nearest other updates; the ``select`` lowest scores win (ties: lower index,
    i.e. job site order) and the result is the plain mean of their deltas.

    ``f``: the number of Byzantine sites tolerated; needs m >= 2f + 3 updates.
    ``select``: how many updates to average (default 1, Krum; > 1 is Multi-Krum).
    """

    def __init__(self, f: int, select: int = 1):
        if not _is_int(f) or f < 0:
            raise ValueError(f"f must be an integer >= 0, got {f!r}")
        if not _is_int(select) or select < 1:
            raise ValueError(f"select must be an integer >= 1, got {select!r}")
        self.f = int(f)
        self.select = int(select)
        self.name = "krum" if self.select == 1 else "multi_krum"
        self._selected: int | None = None

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        _check_updates(self.name, updates)
        m = len(updates)
        if m < 2 * self.f + 3:
            raise RoundError(
                f"{self.name}: f={self.f} needs at least 2f + 3 = {2 * self.f + 3} updates, got m={m}"
            )
        if self.select > m:
            raise RoundError(f"{self.name}: select={self.select} is more than the m={m} updates")
        chosen = self.choose(global_params, updates)
        self._selected = len(chosen)
        log.info(
            "round %d: %s selected sites %s of %d (f=%d)",
            rnd, self.name, [updates[i].site for i in chosen], m, self.f,
        )
        picked = [updates[i] for i in chosen]
        combined = _reduce_deltas(global_params, picked, lambda s: s.mean(dim=0))
        return _finish(global_params, updates, combined)

    def choose(self, global_params: Params, updates: Sequence[Update]) -> list[int]:
        """Indices of the ``select`` updates with the lowest Krum scores, ascending."""
        m = len(updates)
        dist = _pairwise_sq_distances(global_params, updates)
        dist.fill_diagonal_(math.inf)  # an update is not its own neighbour
        neighbours = m - self.f - 2
        scores = dist.sort(dim=1).values[:, :neighbours].sum(dim=1).tolist()
        ranked = sorted(range(m), key=lambda i: (scores[i], i))
        return sorted(ranked[: self.select])

    def round_metrics(self) -> dict[str, float]:
        """``selected``: how many updates the last round averaged."""
        return {} if self._selected is None else {Metric.SELECTED: float(self._selected)}


def _pairwise_sq_distances(global_params: Params, updates: Sequence[Update]) -> torch.Tensor:
    """(m, m) float64 squared L2 distances between the updates' whole deltas, accumulated
    tensor by tensor."""
    m = len(updates)
    dist = torch.zeros((m, m), dtype=torch.float64)
    for name in float_names(updates[0].params):
        # float64: squares of huge malicious entries must not overflow to inf
        s = _stacked_delta(global_params, updates, name).reshape(m, -1).to(torch.float64)
        for i in range(m):
            dist[i] += (s - s[i]).square_().sum(dim=1)
    return dist


class NormBound(Combiner):
    """Norm bounding (Sun et al., 2019): each site's whole delta is clipped to global L2
    norm ``max_norm`` (in parameter units), then the example-weighted mean is taken.

    Goes site by site (one delta in memory at a time, plus the float64 running sum): the
    clipping needs a site's whole delta.
    """

    name = "norm_bound"

    def __init__(self, max_norm: float):
        if not _is_real(max_norm) or not 0 < max_norm < math.inf:
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self._clipped_fraction: float | None = None

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        _check_updates(self.name, updates)
        total = float(sum(u.num_examples for u in updates))
        if not total > 0:
            raise RoundError(f"{self.name}: the updates' example counts sum to {total}, need > 0")
        acc: Params = {}
        dtypes: dict[str, torch.dtype] = {}
        clipped = 0
        for u in updates:
            clipped_delta, norm = clip_to_norm(delta(u.params, global_params), self.max_norm)
            clipped += norm > self.max_norm
            w = u.num_examples / total
            for k, t in clipped_delta.items():
                dtypes[k] = t.dtype
                term = t.to(torch.float64) * w
                acc[k] = acc[k] + term if k in acc else term
        self._clipped_fraction = clipped / len(updates)
        combined = {k: t.to(dtypes[k]) for k, t in acc.items()}
        return _finish(global_params, updates, combined)

    def round_metrics(self) -> dict[str, float]:
        """``clipped_fraction``: share of the last round's updates whose delta norm
        exceeded ``max_norm``."""
        return {} if self._clipped_fraction is None else {Metric.CLIPPED_FRACTION: self._clipped_fraction}
