"""Cyclical weight transfer (``topology: {kind: cyclic}``), readable top to bottom like
the server's round loop (server/loop.py), over the same :class:`Federation`.

Each round the model visits the round's sites one after the other: each trains from what
the previous one passed on, and the round's model is what the last site produced. No rule
merges anything, so the algorithm's server half is not called; its site half (FedProx's
proximal term to the model received, FedBN's local layers) works as with a server.
"""

from __future__ import annotations

import logging

import numpy as np

from medfed.core.errors import RoundError
from medfed.core.params import nbytes
from medfed.core.types import Arm, FitRequest, Metric, Params, Update
from medfed.server.federation import Federation
from medfed.server.loop import (
    Recorder,
    RoundCallback,
    RoundSummary,
    collect_updates,
    evaluate_round,
    make_plan,
    mean_loss,
    record_choice,
    stopped_early,
)
from medfed.tracking.metrics import MEAN_SITE
from medfed.transport.base import Transport

log = logging.getLogger("medfed")

_ORDER_STREAM = 7_919  # keeps the order's draws apart from the sampler's


def visiting_order(selected: list[tuple[int, str]], order: str, seed: int, rnd: int) -> list[tuple[int, str]]:
    """The order the model visits the round's sites: the job's (``fixed``) or a seeded
    shuffle, new each round (``shuffled``)."""
    if order == "fixed":
        return list(selected)
    rng = np.random.default_rng([seed, _ORDER_STREAM, rnd])
    return [selected[i] for i in rng.permutation(len(selected))]


def run_cyclic(
    federation: Federation,
    transport: Transport,
    init_params: Params,
    record: Recorder,
    on_round: RoundCallback | None = None,
    start_round: int = 1,
) -> Params:
    """Run rounds ``start_round`` .. ``job.rounds`` of cyclical weight transfer from
    ``init_params``; return the last round's model. A site that fails or sends an update
    that fails the checks is skipped (logged): the next one trains from the last model that
    came back; a round in which every site fails is a RoundError."""
    job, algorithm, incoming, sampler = federation.job, federation.algorithm, federation.incoming, federation.sampler
    sites = list(job.site_names)
    job_id = job.job_id
    model = init_params
    pinned = {k: init_params[k] for k in federation.frozen if k in init_params}
    ledger = federation.ledger  # DP-SGD: epsilon after each round, the last round the budget allows
    last = job.rounds if ledger is None else min(job.rounds, ledger.last_round)
    for rnd in range(start_round, last + 1):
        # ---- 1. the round's sites, in the order the model visits them
        selected = sampler.select(rnd)
        record_choice(sampler, rnd, selected, record)
        visits = visiting_order(selected, job.topology.order, job.seed, rnd)  # type: ignore[union-attr]
        log.info("cyclic round %d/%d started: %s", rnd, job.rounds, " -> ".join(s for _, s in visits))

        # ---- 2. each site trains from the model the previous one passed on
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.MODEL_BYTES, nbytes(model))
        trained: list[Update] = []
        failed: list[str] = []
        for i, site in visits:
            expect = incoming.spec(model, algorithm.local_keys)
            request = FitRequest(site=site, params=model, encoding=incoming.encoding, expect=expect,
                                 plan=make_plan(job, job_id, Arm.FEDERATED, rnd, i, algorithm.round_extras(model)))
            answers = transport.fit([request], timeout=job.round_timeout)
            try:
                got, _ = collect_updates(answers, model, rnd, 1, Arm.FEDERATED, algorithm, incoming)
            except RoundError:
                failed.append(site)
                log.warning("cyclic round %d: site '%s' skipped; the model goes on from %s", rnd, site,
                            f"site '{trained[-1].site}'" if trained else "the round's start")
                continue
            update = got[0]
            record(rnd, Arm.FEDERATED.value, site, "train", Metric.BYTES_SENT, nbytes(update.params))
            record(rnd, Arm.FEDERATED.value, site, "train", Metric.LOSS, update.metrics.get(Metric.LOSS))
            # what the site keeps (its local layers) stays as the model had it
            model = {k: update.params.get(k, v) for k, v in model.items()}
            if pinned:
                model = {**model, **pinned}
            trained.append(update)
            sampler.observe([update])
        if not trained:
            raise RoundError(f"cyclic round {rnd}: every site failed ({', '.join(failed)}); no model to go on from")

        # ---- 3. evaluate the round's model at every site
        means: dict[str, dict[str, float | None]] = {}
        eps = ledger.epsilon(rnd) if ledger is not None else None
        if eps is not None:
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.EPSILON, eps)
        if rnd % job.eval_every == 0 or rnd == last:
            means = evaluate_round(transport, {s: model for s in sites}, job, Arm.FEDERATED, rnd, record)

        # ---- 4. report the round (the caller checkpoints and tracks the best model)
        loss = mean_loss(trained)
        if on_round is not None:
            on_round(RoundSummary(Arm.FEDERATED, rnd, loss, means, failed, eps), model)
        log.info("cyclic round %d/%d done (%d sites, %d skipped)", rnd, job.rounds, len(trained), len(failed))
    stopped_early(ledger, last, job.rounds)
    return model
