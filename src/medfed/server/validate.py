"""The server's incoming check: an update must fit the global model before it is used."""

from __future__ import annotations

import torch

from medfed.core.types import Params, Update


def update_problem(
    update: Update, global_params: Params, expected_round: int, local_keys: frozenset[str] = frozenset()
) -> str | None:
    """Why ``update`` cannot be aggregated, or None when it is fine.

    Checks the round number, the example count, and that the tensors have exactly the
    global model's names (less ``local_keys``, which stay at the sites), shapes and
    dtypes, and hold only finite values.
    """
    if update.round != expected_round:
        return f"update is for round {update.round}, expected {expected_round}"
    if update.num_examples <= 0:
        return f"num_examples must be > 0, got {update.num_examples}"
    expected = global_params.keys() - local_keys
    missing = expected - update.params.keys()
    extra = update.params.keys() - expected
    if missing or extra:
        return f"tensor names differ from the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    for name in expected:
        ref, t = global_params[name], update.params[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return f"tensor '{name}' is {t.dtype} {tuple(t.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"tensor '{name}' holds NaN or Inf"
    return None
