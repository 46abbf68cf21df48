"""The job's ``contribution`` section: what each training site's updates contributed to the
global model's validation metric, as Shapley values or leave-one-out figures computed by
the server from the updates it already receives (server/contribution.py).

Checked with the job (:func:`contribution_problem`): the figures need each site's own
update and a server rule that combines updates by their weighted mean, so secure
aggregation, robust rules, server optimizers and central DP noise are refused, each with
its reason.
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Any, Literal

from pydantic import Field

from medfed.core.schema import Count, Frozen, Real

EXACT_MAX_SITES = 6  # up to this many sites in a round: every subset (2^n models); above: sampled
MAX_SAMPLES = 100_000

# the evaluation figures a contribution can be measured in, per task kind (val has no HD95)
CONTRIBUTION_METRICS = {"classification": ("auc", "accuracy", "loss"), "segmentation": ("dice", "loss")}


class ContributionConfig(Frozen):
    """Per-site contribution to the global model's ``metric`` (default: ``task.monitor``) on
    the ``split`` of the training sites (their example-weighted mean).

    Round by round, the model of a subset S of the round's sites is the example-weighted
    mean of S's updates (the empty set keeps the round's start model), and its utility the
    metric of that model; ``loss`` counts negated, so that a positive figure always helps.
    ``method: shapley``: each site's Shapley value of the round's gain (GTG-Shapley, Liu et
    al. 2022), exact up to :data:`EXACT_MAX_SITES` sites in a round (2^n models evaluated),
    above that estimated from ``samples`` random orders of the sites with a 95% confidence
    interval; a random order stops evaluating once its sites so far come within
    ``truncation`` (metric units) of the round's full gain. Leave-one-out comes with it.
    ``method: loo``: leave-one-out alone, ``utility(all) - utility(all but the site)`` (n + 1
    models a round). ``rounds``: summed over ``all`` rounds, or the ``last`` only."""

    method: Literal["shapley", "loo"] = "shapley"
    rounds: Literal["all", "last"] = "all"
    samples: Count = Field(200, ge=2, le=MAX_SAMPLES)
    truncation: Real = Field(0.001, ge=0)
    metric: Literal["auc", "accuracy", "dice", "loss"] | None = None
    split: Literal["val", "test"] = "val"


def contribution_metric(job: Any) -> str:
    """The metric a :class:`~medfed.config.Job`'s contribution is measured in: its own, or
    the task's monitor. (``Any``: config/job.py imports this module.)"""
    c = job.contribution
    return c.metric if c is not None and c.metric is not None else job.task.monitor


def contribution_problem(job: Any) -> str | None:
    """Why the :class:`~medfed.config.Job`'s ``contribution`` section cannot be computed (None: it can). Each
    reason names the field and what to change."""
    c = job.contribution
    if c is None:
        return None
    p, a = job.privacy, job.algorithm
    kind = getattr(getattr(job, "topology", None), "kind", "server")
    if kind != "server":
        return (f"contribution: is computed from the updates a server receives in one round, but topology.kind: "
                f"{kind} passes the model from site to site; use topology.kind: server or remove the section")
    if p.secure_aggregation is not None:
        return ("contribution: needs each site's own update, but privacy.secure_aggregation shows the server only "
                "their sum; remove one of the two sections")
    if p.dp is not None and p.dp.noise == "central":
        return ("contribution: privacy.dp with noise: central protects the released model only; figures computed "
                "from each site's un-noised update would reveal what the noise hides, outside the privacy "
                "accounting. Use privacy.dp.noise: local (each site noises its own update) or remove one section")
    if job.robust is not None:
        return (f"contribution: a subset's model is the weighted mean of its updates, but robust: {job.robust.rule} "
                "combines them otherwise; remove one of the two sections")
    if not a.uses_mean:
        return (f"contribution: a subset's model is the weighted mean of its updates, but algorithm '{a.name}' "
                f"{a.beyond_mean}; use fedavg, fedprox, fedbn, fedper, fedrep, ditto or moon")
    if a.name in ("fedavgm", "fedadagrad", "fedadam", "fedyogi"):
        return (f"contribution: a subset's model is the weighted mean of its updates, but algorithm '{a.name}' "
                "takes a server optimizer step from that mean, with state kept across rounds; use fedavg, fedprox, "
                "fedbn, fedper, fedrep, ditto or moon")
    task = job.task.kind
    allowed = CONTRIBUTION_METRICS[task]
    if c.metric is not None and c.metric not in allowed:
        return f"contribution.metric: '{c.metric}' is not a {task} metric on {c.split}; use one of {list(allowed)}"
    return None
