"""The two baselines every medical FL paper reports, trained with the same local step,
the same model initialisation and the same budget of local epochs as the federation.

* local: each site trains alone on its own data, round after round, never sharing.
* centralized: one model trained on all sites' training data pooled.
* finetuned: the final federated model, fine-tuned at each site on its own data.
* zero_filled (reconstruction): the undersampled input itself, scored with no network.
Both are evaluated on every site's own val and test splits, like the federated model.
"""

from __future__ import annotations

from dataclasses import replace

from medfed.config import Job
from medfed.core.types import Arm, FitRequest, Metric, Params
from medfed.server.loop import (
    Recorder,
    RoundCallback,
    RoundSummary,
    mean_loss,
    collect_updates,
    evaluate_round,
    make_plan,
)
from medfed.tracking.metrics import MEAN_SITE
from medfed.transport.base import CENTRALIZED_SITE, Transport


def run_zero_filled(job: Job, transport: Transport, params: Params, record: Recorder) -> dict[str, dict[str, float | None]]:
    """Reconstruction: score every site's zero-filled input as it is (the sites evaluate
    the identity, whatever ``params`` are), recorded as the ``zero_filled`` arm at the last
    round, so every table shows what a network adds. Nothing trains; the input is the same
    in every arm (data/kspace.py)."""
    return evaluate_round(transport, {s: params for s in job.site_names}, job, Arm.ZERO_FILLED, job.rounds, record)


def run_local(
    job: Job, transport: Transport, init_params: Params, record: Recorder, on_round: RoundCallback | None = None
) -> dict[str, Params]:
    """Each training site trains its own model from ``init_params``; returns the final
    models by site. (A held-out site has no local model: it never trains.)"""
    sites = list(job.training_sites)
    job_id = job.job_id
    params = {s: init_params for s in sites}
    for rnd in range(1, job.rounds + 1):
        requests = [FitRequest(s, params[s], make_plan(job, job_id, Arm.LOCAL, rnd, i)) for i, s in enumerate(sites)]
        answers = transport.fit(requests, timeout=job.round_timeout)
        updates, failed = collect_updates(answers, init_params, rnd, job.quorum, Arm.LOCAL)
        for u in updates:
            params[u.site] = u.params
            record(rnd, Arm.LOCAL.value, u.site, "train", Metric.LOSS, u.metrics.get(Metric.LOSS))
        means = {}
        if rnd % job.eval_every == 0 or rnd == job.rounds:
            means = evaluate_round(transport, params, job, Arm.LOCAL, rnd, record)
        if on_round is not None:
            on_round(RoundSummary(Arm.LOCAL, rnd, mean_loss(updates), means, failed), init_params)
    return params


def run_finetuned(
    job: Job, transport: Transport, global_params: Params, record: Recorder, on_round: RoundCallback | None = None
) -> dict[str, Params]:
    """Local fine-tuning after federation: every site trains the final federated model
    for ``job.finetune_epochs`` epochs on its own data (starting from its own personal
    layers where the algorithm keeps some), then evaluates it. Recorded at the last round."""
    sites, rnd = list(job.training_sites), job.rounds
    base = make_plan(job, job.job_id, Arm.FINETUNED, rnd, 0)
    plan_of = {
        s: replace(
            base, train=replace(make_plan(job, base.job_id, Arm.FINETUNED, rnd, i).train, local_epochs=job.finetune_epochs)
        )
        for i, s in enumerate(sites)
    }
    answers = transport.fit([FitRequest(s, global_params, plan_of[s]) for s in sites], timeout=job.round_timeout)
    updates, failed = collect_updates(answers, global_params, rnd, job.quorum, Arm.FINETUNED)
    tuned = {u.site: {**global_params, **u.params} for u in updates}
    for u in updates:
        record(rnd, Arm.FINETUNED.value, u.site, "train", Metric.LOSS, u.metrics.get(Metric.LOSS))
    means = evaluate_round(transport, tuned, job, Arm.FINETUNED, rnd, record)
    if on_round is not None:
        on_round(RoundSummary(Arm.FINETUNED, 1, mean_loss(updates), means, failed), global_params)
    return tuned


def run_centralized(
    job: Job, transport: Transport, init_params: Params, record: Recorder, on_round: RoundCallback | None = None
) -> Params:
    """One model trained on the training sites' data pooled, evaluated at every site;
    returns its final parameters."""
    params, job_id = init_params, job.job_id
    for rnd in range(1, job.rounds + 1):
        request = FitRequest(CENTRALIZED_SITE, params, make_plan(job, job_id, Arm.CENTRALIZED, rnd, 0))
        (update,), _ = collect_updates(transport.fit([request], job.round_timeout), params, rnd, 1, Arm.CENTRALIZED)
        params = update.params
        record(rnd, Arm.CENTRALIZED.value, MEAN_SITE, "train", Metric.LOSS, update.metrics.get(Metric.LOSS))
        means = {}
        if rnd % job.eval_every == 0 or rnd == job.rounds:
            means = evaluate_round(transport, {s: params for s in job.site_names}, job, Arm.CENTRALIZED, rnd, record)
        if on_round is not None:
            on_round(RoundSummary(Arm.CENTRALIZED, rnd, update.metrics.get(Metric.LOSS), means), params)
    return params
