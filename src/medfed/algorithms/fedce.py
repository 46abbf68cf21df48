"""FedCE (Jiang, Roth, Li et al., CVPR 2023, "Fair Federated Medical Image Segmentation via
Client Contribution Estimation"): aggregation weights from each site's estimated
contribution, in gradient space and in data space, for fairness between sites.

Each round the server holds one coefficient ``c_k`` per site (``1/n`` in the first
round) and sends each site its own. Site k:

* before training, forms the global model without its last contribution,
  ``(w - c_k w_k') / (1 - c_k)`` with ``w_k'`` the model it sent last round (the
  "others' model"), scores it on its validation split with the task's monitored metric
  ``m`` (Dice, AUC or accuracy), and sends ``1 - mean(m over its rounds)`` (0 counted in
  its first round) as the extra ``fedce/minus``: the worse the others' model does on its
  data, the more the site adds;
* trains as in FedAvg and sends its model.

The server, with ``d_k = w_k - w`` (trainable entries, flattened) and the current
coefficients: the consensus change ``g = sum_k c_k d_k``, the others' change
``g - c_k d_k``, its cosine with ``d_k`` kept per round; the gradient-space estimate is
``1 - the mean of that cosine over the rounds``, normalized over the sites. The data-space
estimate is the sites' ``fedce/minus`` normalized. Both are floored at 1e-3, then
multiplied (``mode: times``) or added (``plus``), normalized, floored at 1e-3 and
normalized again: the new coefficients, which also weight this round's aggregate
``sum_k c_k w_k`` (buffers included; whole-number buffers rounded). The normalization
after the last floor (so that the weights sum to one) is medfed's; the rest follows the
authors' description and their NVFlare implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medfed.algorithms.base import Algorithm, SiteHook
from medfed.algorithms.mean import weighted_average
from medfed.core.types import Params, RoundPlan, Update

COEF_KEY = "fedce/coef"  # the site's coefficient, sent to it alone: one float64 value
MINUS_KEY = "fedce/minus"  # the site's data-space estimate, sent with its update: one float64 value
FLOOR = 1e-3  # the smallest estimate or weight a site keeps


class FedCEHook(SiteHook):
    """Scores the others' model on the site's validation split before it trains; keeps the
    model it sent for the next round's score."""

    def __init__(self) -> None:
        self.last: Params | None = None  # the model this site sent in its last round
        self.scores: list[float] = []  # the others' model's metric each round (0 in the first)

    def state(self) -> Params:
        out = {f"last/{k}": v.clone() for k, v in (self.last or {}).items()}
        if self.scores:
            out["scores/all"] = torch.tensor(self.scores, dtype=torch.float64)
        return out

    def load_state(self, state: Params) -> None:
        last = {k.removeprefix("last/"): v.clone() for k, v in state.items() if k.startswith("last/")}
        wrong = [k for k in state if not k.startswith("last/") and k != "scores/all"]
        if wrong:
            raise ValueError(f"FedCEHook: unexpected site state entry '{wrong[0]}'")
        self.last = last or None
        scores = state.get("scores/all")
        self.scores = [float(v) for v in scores.reshape(-1).tolist()] if scores is not None else []

    def probe(self, global_params: Params, plan: RoundPlan) -> Params | None:
        coef = plan.extras.get(COEF_KEY)
        if self.last is None or coef is None:
            self.scores.append(0.0)  # the first round: as the authors, no estimate yet
            return None
        c = float(coef.reshape(-1)[0]) if coef.numel() == 1 else math.nan
        if not (math.isfinite(c) and 0.0 <= c < 1.0):
            raise ValueError(f"'{COEF_KEY}' from the server must be one value in [0, 1), got {c!r}")
        return minus_model(global_params, self.last, c)

    def on_probe(self, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.scores.append(float(value))

    def on_train_end(self, model: nn.Module, num_steps: int) -> Params:
        self.last = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        error = 1.0 - sum(self.scores) / max(len(self.scores), 1)
        return {MINUS_KEY: torch.tensor([error], dtype=torch.float64)}


def minus_model(global_params: Params, last: Params, c: float) -> Params:
    """``(w - c w_k') / (1 - c)`` on the floating-point entries; the others as ``w``."""
    out: Params = {}
    for k, w in global_params.items():
        mine = last.get(k)
        if not w.is_floating_point() or mine is None or mine.shape != w.shape:
            out[k] = w
            continue
        out[k] = ((w.to(torch.float64) - c * mine.to(torch.float64)) / (1.0 - c)).to(w.dtype)
    return out


def normalized(values: Sequence[float]) -> list[float]:
    """``values`` divided by their sum, then floored at :data:`FLOOR`."""
    total = sum(values)
    if not total > 0:
        return [1.0 / len(values)] * len(values)
    return [max(v / total, FLOOR) for v in values]


class FedCE(Algorithm):
    name = "fedce"

    def __init__(self, mode: str = "times", trainable: frozenset[str] = frozenset()):
        super().__init__(trainable)
        if mode not in ("times", "plus"):
            raise ValueError(f"algorithm.mode: must be 'times' or 'plus', got {mode!r}")
        self.mode = mode
        # the state across rounds, per site: its coefficient, and the sum and count of its
        # cosines (checkpointed with the server state)
        self.coef: Params = {}
        self.cos_sum: Params = {}
        self.cos_count: Params = {}

    state_fields = ("coef", "cos_sum", "cos_count")

    def make_site_hook(self) -> SiteHook:
        return FedCEHook()

    def site_extras(self, site: str) -> Params:
        c = self.coef.get(site)
        return {} if c is None else {COEF_KEY: c.clone()}

    def update_problem(self, update: Update, global_params: Params) -> str | None:
        value = update.extras.get(MINUS_KEY)
        if value is None:
            return f"fedce needs the site's data-space estimate ('{MINUS_KEY}'), the update has none"
        if value.numel() != 1 or not value.is_floating_point():
            return f"'{MINUS_KEY}' must hold one floating-point value, got {value.dtype} {tuple(value.shape)}"
        v = float(value.reshape(-1)[0])
        if not (math.isfinite(v) and -1.0 <= v <= 2.0):
            return f"'{MINUS_KEY}' must be one minus a mean metric in [0, 1], got {v!r}"
        return None

    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        sites = [u.site for u in updates]
        coef = {s: float(self.coef[s]) if s in self.coef else 1.0 / len(updates) for s in sites}
        names = [n for n in sorted(self.trainable) if n in global_params and global_params[n].is_floating_point()]
        change = {u.site: _flat(u.params, global_params, names) for u in updates}
        consensus = sum(coef[s] * change[s] for s in sites)
        for s in sites:  # the cosine of each site's change with the others' combined change
            others = consensus - coef[s] * change[s]
            cos = float(torch.nn.functional.cosine_similarity(change[s], others, dim=0)) if len(sites) > 1 else 0.0
            self.cos_sum[s] = self.cos_sum.get(s, torch.zeros(1, dtype=torch.float64)) + cos
            self.cos_count[s] = self.cos_count.get(s, torch.zeros(1, dtype=torch.float64)) + 1
        gradient = normalized([1.0 - float(self.cos_sum[s] / self.cos_count[s]) for s in sites])
        data = normalized([max(float(u.extras[MINUS_KEY].reshape(-1)[0]), 0.0) for u in updates])
        both = [g * d if self.mode == "times" else g + d for g, d in zip(gradient, data)]
        weights = normalized(both)
        total = sum(weights)
        weights = [w / total for w in weights]  # floored, then summing to one again
        self.coef = {s: torch.tensor([w], dtype=torch.float64) for s, w in zip(sites, weights)}
        return weighted_average([u.params for u in updates], weights)


def _flat(params: Params, reference: Params, names: list[str]) -> torch.Tensor:
    """``params - reference`` over ``names``, as one float64 vector."""
    if not names:
        return torch.zeros(1, dtype=torch.float64)
    return torch.cat([(params[n].to(torch.float64) - reference[n].to(torch.float64)).reshape(-1) for n in names])
