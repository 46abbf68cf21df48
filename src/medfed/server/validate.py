"""The server's incoming checks: an update must fit the round's spec, and an evaluation
answer the task's metrics and the site's split sizes, before either is used."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from medfed.core.tensors import PartedTensors, describe, flat_slices
from medfed.core.params import all_finite
from medfed.core.types import Encoding, EvalResult, Params, Spec, Split, Update


def full_spec(global_params: Params, local_keys: frozenset[str] = frozenset()) -> Spec:
    """The spec of full-value updates: the global model's names (less ``local_keys``, which
    stay at the sites), shapes and dtypes."""
    return {k: (tuple(t.shape), t.dtype) for k, t in global_params.items() if k not in local_keys}


def update_problem(
    update: Update, spec: Spec, expected_round: int, encoding: Encoding = Encoding.FULL
) -> str | None:
    """Why ``update`` cannot be used, or None when it is fine.

    Checks the round number, the example count, the encoding, that the tensors have
    exactly the names, shapes and dtypes of ``spec``, and that floating-point ones hold
    only finite values. What an encoding's values mean (indices in range...) is checked
    when it is decoded (privacy/compression.py, privacy/secagg/)."""
    if update.round != expected_round:
        return f"update is for round {update.round}, expected {expected_round}"
    if update.num_examples <= 0:
        return f"num_examples must be > 0, got {update.num_examples}"
    if update.encoding is not encoding:
        return f"update is encoded as '{update.encoding.value}', the job expects '{encoding.value}'"
    missing = spec.keys() - update.params.keys()
    extra = update.params.keys() - spec.keys()
    if missing or extra:
        return f"tensor names differ from the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    for name, (shape, dtype) in spec.items():
        got_shape, got_dtype = describe(update.params, name)
        if got_shape != shape or got_dtype != dtype:
            return f"tensor '{name}' is {got_dtype} {got_shape}, expected {dtype} {shape}"
        if got_dtype.is_floating_point and not _finite(update.params, name):
            return f"tensor '{name}' holds NaN or Inf"
    return None


def _finite(params: Params, name: str) -> bool:
    """Whether a floating-point tensor holds only finite values. A tensor still on disk is
    read in parts, and the answer kept: the server checks an update when it arrives and
    again in the round loop, and reads it only once."""
    if isinstance(params, PartedTensors):
        if name not in params.finite:
            params.finite[name] = all(all_finite(p) for p in flat_slices(params, name))
        return params.finite[name]
    return all_finite(params[name])


def eval_problem(
    results: Sequence[EvalResult], bounds: Mapping[str, tuple[float, float]], sizes: Mapping[Split, int] | None
) -> str | None:
    """Why an evaluation answer cannot be used, or None when it is fine.

    Each split's example count must be the size the site declared for that split
    (``sizes``, from its data summary), every metric name one the task reports
    (``bounds``, see :func:`medfed.tasks.metric_bounds`) and every value finite and within
    its range (None, an undefined metric, is fine): a site cannot outweigh the others with
    an inflated count, nor add figures of its own to the consortium's."""
    for r in results:
        if sizes is not None and r.split in sizes and r.num_examples != sizes[r.split]:
            return (f"{r.split.value}: {r.num_examples} examples evaluated, the site declared "
                    f"{sizes[r.split]} in its data summary")
        for name, value in r.metrics.items():
            if name not in bounds:
                known = sorted(bounds)
                listed = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
                return f"{r.split.value}: metric {name!r} is not one the task reports ({listed})"
            if value is None:
                continue
            lo, hi = bounds[name]
            if not math.isfinite(value) or not lo <= value <= hi:
                return f"{r.split.value}: metric '{name}' is {value!r}, outside [{lo:g}, {hi:g}]"
    return None
