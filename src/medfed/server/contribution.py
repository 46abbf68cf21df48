"""Per-site contribution to the global model, from the updates the server already received
(the job's ``contribution`` section; GTG-Shapley, Liu et al., IEEE BigData 2022).

Round by round, :class:`ContributionTracker` sees the round's start model and the updates
that passed the checks (``run_federated``'s ``on_updates``). The model of a subset S of the
round's sites is FedAvg's rule applied to S alone: the example-weighted mean of S's
updates, with the entries nobody sent (layers kept at the sites) and the frozen ones kept
from the start model; the empty set keeps the start model. Its utility is the job's metric
of that model on the training sites' ``split`` (val by default), each site evaluating it
through the transport as it evaluates the global model, pooled as site ``all`` is (the
example-weighted mean). Nothing is retrained and nothing new leaves a site: only figures of
models rebuilt from updates the server holds anyway.

Each round's gain, ``utility(all) - utility(none)``, is shared among its sites by their
Shapley values (server/shapley.py: exact up to ``EXACT_MAX_SITES`` sites, 2^n models;
sampled above); a site's contribution is the sum over the rounds counted. Leave-one-out
(``utility(all) - utility(all but the site)``) comes with it. Memory: one rebuilt model at
a time besides the round's updates, which the round holds anyway; nothing is kept across
rounds but the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from medfed.algorithms.mean import weighted_average
from medfed.config import Job
from medfed.config.contribution import EXACT_MAX_SITES, contribution_metric
from medfed.core.types import (
    Arm,
    EvalRequest,
    Params,
    SiteFailure,
    Split,
    Update,
    lower_is_better,
)
from medfed.server.shapley import (
    Coalition,
    Memo,
    exact_shapley,
    leave_one_out,
    sampled_shapley,
)
from medfed.tracking.contribution import (
    Contribution,
    Estimator,
    RoundContribution,
    summarize,
)
from medfed.transport.base import Transport

if TYPE_CHECKING:
    from medfed.server.federation import Federation

log = logging.getLogger("medfed")

_CONTRIBUTION_STREAM = 7  # keeps the sampled orders' seeds apart from every other stream of the job


class UtilityUndefined(Exception):
    """A subset's model has no defined metric (a site could not evaluate it, or no site's
    figure is defined): the round's figures cannot be computed."""


class ContributionTracker:
    """Computes each round's figures as its updates arrive (:meth:`observe`) and sums them
    (:meth:`result`). ``frozen``: the parameters ``model.freeze`` keeps at their starting
    values; ``last_round``: the last round the federation will run (the privacy budget may
    stop it before ``job.rounds``), for ``rounds: last``."""

    def __init__(self, job: Job, transport: Transport, frozen: frozenset[str] = frozenset(),
                 last_round: int | None = None):
        if job.contribution is None:
            raise ValueError("ContributionTracker needs a job with a contribution section")
        self.job, self.transport, self.frozen = job, transport, frozen
        self.settings = job.contribution
        self.metric = contribution_metric(job)
        self.split = Split(self.settings.split)
        self.last_round = last_round if last_round is not None else job.rounds
        self.rounds: list[RoundContribution] = []
        self.skipped: list[tuple[int, str]] = []

    def observe(self, rnd: int, start: Params, updates: Sequence[Update]) -> None:
        """The figures of round ``rnd`` from its start model and its valid updates (job order)."""
        if self.settings.rounds == "last" and rnd != self.last_round:
            return
        sites = tuple(u.site for u in updates)
        try:
            self.rounds.append(self._round(rnd, start, updates))
        except UtilityUndefined as e:
            reason = str(e)
            self.skipped.append((rnd, reason))
            log.warning("contribution: round %d left out: %s", rnd, reason)
            return
        log.info("contribution: round %d done (%d sites: %s)", rnd, len(sites), ", ".join(sites))

    def result(self) -> Contribution:
        s = self.settings
        return summarize(s.method, self.metric, s.split, s.rounds, self.job.training_sites, self.rounds, self.skipped)

    # ------------------------------------------------------------------ one round

    def _round(self, rnd: int, start: Params, updates: Sequence[Update]) -> RoundContribution:
        n = len(updates)
        utility = Memo(lambda members: self._utility(rnd, start, updates, members))
        everyone = frozenset(range(n))
        shapley = halfwidths = None
        if self.settings.method == "loo":
            estimator = Estimator.LOO
        elif n <= EXACT_MAX_SITES:
            estimator = Estimator.EXACT
            shapley = exact_shapley(n, utility).values
        else:
            estimator = Estimator.SAMPLED
            seed = np.random.SeedSequence([self.job.seed, _CONTRIBUTION_STREAM, rnd])
            est = sampled_shapley(n, utility, self.settings.samples, np.random.default_rng(seed),
                                  self.settings.truncation)
            shapley, halfwidths = est.values, est.halfwidths
        loo = leave_one_out(n, utility)
        return RoundContribution(
            round=rnd, sites=tuple(u.site for u in updates), estimator=estimator, evaluations=len(utility),
            utility_start=utility(frozenset()), utility_all=utility(everyone), loo=loo, shapley=shapley,
            halfwidths=halfwidths,
        )

    def _utility(self, rnd: int, start: Params, updates: Sequence[Update], members: Coalition) -> float:
        """The metric of the model rebuilt from the updates ``members`` (indexes into
        ``updates``), pooled over the training sites; negated where less is better."""
        model = subset_model(start, [updates[i] for i in sorted(members)], self.frozen)
        job = self.job
        requests = [EvalRequest(site=s, params=model, splits=(self.split,), job_id=job.job_id, round=rnd,
                                arm=Arm.FEDERATED) for s in job.training_sites]
        total, weight = 0.0, 0
        for req, answer in zip(requests, self.transport.evaluate(requests, timeout=job.round_timeout)):
            if isinstance(answer, SiteFailure):
                raise UtilityUndefined(f"site '{req.site}' could not evaluate a subset's model: {answer.cause}")
            for res in answer:
                value = res.metrics.get(self.metric)
                if value is not None:
                    total += value * res.num_examples
                    weight += res.num_examples
        if weight == 0:
            which = "no update" if not members else f"the updates of {', '.join(updates[i].site for i in sorted(members))}"
            raise UtilityUndefined(f"the model of {which} has no defined {self.split.value} {self.metric} at any "
                                   "training site")
        mean = total / weight
        return -mean if lower_is_better(self.metric) else mean


def contribution_tracker(job: Job, federation: Federation, transport: Transport) -> ContributionTracker | None:
    """The tracker of ``job``'s contribution section for ``federation`` (None when the job
    has none), evaluating through ``transport``."""
    if job.contribution is None:
        return None
    ledger = federation.ledger
    last = job.rounds if ledger is None else min(job.rounds, ledger.last_round)
    return ContributionTracker(job, transport, federation.frozen, last)


def subset_model(start: Params, updates: Sequence[Update], frozen: frozenset[str] = frozenset()) -> Params:
    """FedAvg's rule over ``updates`` alone: their example-weighted mean, with the entries
    none of them sent and the ``frozen`` ones taken from ``start``; ``start`` itself when
    ``updates`` is empty. For all of a round's updates this is the round's new global model."""
    if not updates:
        return start
    mean = weighted_average([u.params for u in updates], [u.num_examples for u in updates])
    return {k: v if k in frozen else mean.get(k, v) for k, v in start.items()}
