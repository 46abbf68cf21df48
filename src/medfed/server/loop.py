"""THE round loop of a federated run, readable top to bottom.

It knows nothing of how sites are reached (the transport), what the algorithm does (its
hook and rule) or how metrics are stored (the recorder); it sequences them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from medfed.algorithms.base import Algorithm
from medfed.config import Job
from medfed.core.errors import CodecError, RoundError
from medfed.core.params import nbytes
from medfed.core.types import (
    Arm,
    EvalRequest,
    EvalResult,
    FitRequest,
    Metric,
    Params,
    RoundPlan,
    SecAggPlan,
    SiteFailure,
    Split,
    TrainSettings,
    Update,
)
from medfed.server.federation import Federation
from medfed.server.sampling import SiteSampler
from medfed.server.unbiased import ANSWERED, CHANCE, MULTIPLICITY, STEPS
from medfed.server.update_path import UpdateFormat
from medfed.server.validate import update_problem
from medfed.tracking.metrics import MEDIAN_SITE, MEAN_SITE
from medfed.transport.base import Transport

if TYPE_CHECKING:
    from medfed.privacy.accounting import PrivacyLedger


log = logging.getLogger("medfed")

CHOSEN = "chosen"  # sampling by loss or adaptive: 1 for a site chosen in its round, 0 for one passed over
_ARM_CODE = {Arm.FEDERATED: 0, Arm.LOCAL: 1, Arm.CENTRALIZED: 2, Arm.FINETUNED: 3, Arm.PERSONALIZED: 4}
EVAL_SPLITS = (Split.VAL, Split.TEST)


def round_seed(job_seed: int, arm: Arm, rnd: int, site_index: int) -> int:
    """The seed of one site's local training in one round: independent streams per
    (job seed, arm, round, site), identical run after run."""
    ss = np.random.SeedSequence([job_seed, _ARM_CODE[arm], rnd, site_index])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def make_plan(
    job: Job, job_id: str, arm: Arm, rnd: int, site_index: int, extras: Params | None = None,
    secagg: SecAggPlan | None = None,
) -> RoundPlan:
    t = job.train
    return RoundPlan(
        job_id=job_id,
        round=rnd,
        arm=arm,
        train=TrainSettings(
            local_epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            optimizer=t.optimizer,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            seed=round_seed(job.seed, arm, rnd, site_index),
        ),
        extras=extras or {},
        secagg=secagg,
    )



@dataclass
class RoundSummary:
    """What the progress display and the best-model tracker need after a round."""

    arm: Arm
    round: int
    train_loss: float | None
    means: dict[str, dict[str, float | None]] = field(default_factory=dict)  # split -> metric -> mean
    failed: list[str] = field(default_factory=list)
    epsilon: float | None = None  # privacy spent so far (with DP)


Recorder = Callable[[int, str, str, str, str, "float | None"], None]
RoundCallback = Callable[[RoundSummary, Params], None]


def collect_updates(
    answers: Sequence[Update | SiteFailure],
    global_params: Params,
    rnd: int,
    quorum: int,
    arm: Arm,
    algorithm: Algorithm | None = None,
    incoming: UpdateFormat = UpdateFormat(),
) -> tuple[list[Update], list[str]]:
    """Valid updates in request order, decoded to full values (masked ones stay masked),
    and the names of sites that failed (logged).

    An update passes the generic checks against the round's spec (server/validate.py),
    decodes, and passes the algorithm's own checks when given (e.g. its control
    variates)."""
    updates, failed = [], []
    local = algorithm.local_keys if algorithm is not None else frozenset()
    spec = incoming.spec(global_params, local)
    for a in answers:
        if isinstance(a, SiteFailure):
            problem = a.cause
        else:
            problem = update_problem(a, spec, rnd, incoming.encoding)
            if problem is None:
                try:
                    a = incoming.decode(a, global_params, local)
                except CodecError as e:
                    problem = str(e)
            if problem is None and algorithm is not None:
                problem = algorithm.update_problem(a, global_params)
        if problem is None:
            updates.append(a)
        else:
            failed.append(a.site)
            log.warning("%s round %d: site '%s' left out: %s", arm.value, rnd, a.site, problem)
    if len(updates) < quorum:
        raise RoundError(
            f"{arm.value} round {rnd}: only {len(updates)} site(s) answered, "
            f"the quorum is {quorum} (failed: {', '.join(failed) or 'none'})"
        )
    return updates, failed


def evaluate_round(
    transport: Transport, params_by_site: dict[str, Params], job: Job, arm: Arm, rnd: int, record: Recorder
) -> dict[str, dict[str, float | None]]:
    """Evaluate each site's model on its val and test splits, record per-site values, the
    example-weighted mean over the training sites (site ``all``) and their median (site
    ``median``: a consortium figure that one site's answer cannot move far); held-out
    sites are recorded under their own names only. Return the means."""
    job_id = job.job_id
    requests = [
        EvalRequest(site=s, params=p, splits=EVAL_SPLITS, job_id=job_id, round=rnd, arm=arm)
        for s, p in params_by_site.items()
    ]
    answers = transport.evaluate(requests, timeout=job.round_timeout)
    return tally_evaluation([(r.site, a) for r, a in zip(requests, answers)], job, arm, rnd, record)


def tally_evaluation(
    answers: Sequence[tuple[str, list[EvalResult] | SiteFailure]], job: Job, arm: Arm, rnd: int, record: Recorder
) -> dict[str, dict[str, float | None]]:
    """Record each site's evaluation results, the example-weighted mean over the training
    sites and their median (see :func:`evaluate_round`); return the means."""
    values: dict[tuple[str, str], list[tuple[float | None, int]]] = {}  # (split, metric) -> (value, n) per site
    for site, answer in answers:
        if isinstance(answer, SiteFailure):
            log.warning("%s round %d: site '%s' could not evaluate: %s", arm.value, rnd, site, answer.cause)
            continue
        for res in answer:
            for metric, value in res.metrics.items():
                record(rnd, arm.value, res.site, res.split.value, metric, value)
                if res.site not in job.held_out:
                    values.setdefault((res.split.value, metric), []).append((value, res.num_examples))
    means: dict[str, dict[str, float | None]] = {}
    for (split, metric), per_site in values.items():
        defined = [(v, n) for v, n in per_site if v is not None]
        n = sum(k for _, k in defined)
        mean = sum(v * k for v, k in defined) / n if n > 0 else None
        means.setdefault(split, {})[metric] = mean
        record(rnd, arm.value, MEAN_SITE, split, metric, mean)
        median = float(np.median([v for v, _ in defined])) if defined else None
        record(rnd, arm.value, MEDIAN_SITE, split, metric, median)
    return means


def run_federated(
    federation: Federation,
    transport: Transport,
    init_params: Params,
    record: Recorder,
    on_round: RoundCallback | None = None,
    start_round: int = 1,
    on_updates: Callable[[int, Params, list[Update]], None] | None = None,
) -> Params:
    """Run rounds ``start_round`` .. ``job.rounds`` of federated training from
    ``init_params``; return the final global params.

    The federation's sampler picks each round's sites; every site, held-out ones included,
    evaluates the global model. A resumed run passes the checkpointed params and the round
    after the checkpoint. The algorithm's combiner says how updates are combined; the
    ledger (with DP) gives each round's epsilon and stops training before the budget is
    passed. ``on_updates`` sees each round's start model and valid updates before they
    are aggregated (server/contribution.py)."""
    job, algorithm, incoming, sampler, ledger = (
        federation.job, federation.algorithm, federation.incoming, federation.sampler, federation.ledger)
    sites = list(job.site_names)
    job_id = job.job_id
    global_params = init_params
    pinned = {k: init_params[k] for k in federation.frozen if k in init_params}  # model.freeze: never change
    # sites that have trained (and so hold a personal model, for algorithms that keep one)
    personal: set[str] = {s for r in range(1, start_round) for _, s in sampler.select(r)}
    last = job.rounds if ledger is None else min(job.rounds, ledger.last_round)
    for rnd in range(start_round, last + 1):
        # ---- 1. select the sites of this round
        selected = sampler.select(rnd)
        log.info("federated round %d/%d started: %s", rnd, job.rounds, ", ".join(s for _, s in selected))
        record_choice(sampler, rnd, selected, record)

        # ---- 2. send the global parameters and the round plan; sites train locally
        extras = algorithm.round_extras(global_params)
        prepared = algorithm.combiner.prepare(rnd, [s for _, s in selected], global_params)  # secure aggregation's keys
        expect = incoming.spec(global_params, algorithm.local_keys)  # what each update must look like
        requests = [
            FitRequest(site=s, params=global_params,
                       plan=make_plan(job, job_id, Arm.FEDERATED, rnd, i, {**extras, **algorithm.site_extras(s)},
                                      prepared.get(s)),
                       expect=expect, encoding=incoming.encoding)
            for i, s in selected
        ]
        answers = transport.fit(requests, timeout=job.round_timeout)

        # ---- 3. collect the updates that pass the incoming checks and decode; enforce the quorum
        # tensor bytes each site sent, as encoded (what compression saves), against the model's
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.MODEL_BYTES, nbytes(global_params))
        for a in answers:
            if isinstance(a, Update):
                record(rnd, Arm.FEDERATED.value, a.site, "train", Metric.BYTES_SENT, nbytes(a.params) + nbytes(a.extras))
        updates, failed = collect_updates(  # (unbiased sampling may draw fewer sites than the round's count)
            answers, global_params, rnd, min(job.quorum, len(selected)), Arm.FEDERATED, algorithm, incoming
        )
        sampler.observe(updates)  # sampling by loss chooses the next rounds' sites by these losses
        record_answers(sampler, rnd, updates, record)  # unbiased sampling: who answered weighs the next draws
        check_site_states(updates, federation.kept_rounds, rnd)  # each site trained from its state of last round kept
        for u in updates:
            record(rnd, Arm.FEDERATED.value, u.site, "train", Metric.LOSS, u.metrics.get(Metric.LOSS))
            personal.add(u.site)  # has trained once: holds a personal model if the algorithm keeps one

        if on_updates is not None:  # the round's start model and valid updates, e.g. per-site contribution
            on_updates(rnd, global_params, updates)

        # ---- 4. aggregate with the algorithm's server rule (its combiner: mean, robust rule, DP, secure sum)
        coefficients = sampler.coefficients(rnd, updates)  # unbiased sampling: the draw's weights, not the examples'
        if coefficients is not None:
            algorithm.combiner.weigh(coefficients)
        global_params = algorithm.aggregate(global_params, updates)
        if pinned:  # what noise, rounding or the rule made of the frozen parameters is undone
            global_params = {**global_params, **{k: v for k, v in pinned.items() if k in global_params}}
        loss, n_updates = mean_loss(updates), len(updates)
        del answers, updates  # let go of the updates (and their buffers) before the next round
        for name, value in algorithm.combiner.round_metrics().items():
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", name, value)
        if ledger is not None:
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.EPSILON, ledger.epsilon(rnd))

        # ---- 5. evaluate the new global model at every site
        means: dict[str, dict[str, float | None]] = {}
        if rnd % job.eval_every == 0 or rnd == last:
            means = evaluate_round(transport, {s: global_params for s in sites}, job, Arm.FEDERATED, rnd, record)
            if algorithm.personal_models:  # each site's personal model, on its own data
                have = {s: global_params for s in sites if s in personal}
                evaluate_round(transport, have, job, Arm.PERSONALIZED, rnd, record)

        # ---- 6. report the round (the caller checkpoints and tracks the best model): "done"
        # is logged once the round is saved
        eps = ledger.epsilon(rnd) if ledger is not None else None
        if on_round is not None:
            on_round(RoundSummary(Arm.FEDERATED, rnd, loss, means, failed, eps), global_params)
        spent = f", epsilon {eps:.3g} at delta {ledger.delta:g}" if ledger is not None else ""
        log.info("federated round %d/%d done (%d sites, %d failed%s)", rnd, job.rounds, n_updates, len(failed), spent)
    stopped_early(ledger, last, job.rounds)
    return global_params


def check_site_states(updates: Sequence[Update], kept_rounds: dict[str, int], rnd: int) -> None:
    """Log each site whose algorithm state was not from the last round the run kept its
    update from (it lost its state, or trained a round whose update was not kept): from
    then on the run is not the one an uninterrupted run would give. Then remember ``rnd``
    as the last round kept for these sites."""
    for u in updates:
        expected = kept_rounds.get(u.site, 0)
        if u.state_round is not None and u.state_round != expected:
            what = f"its state of round {u.state_round}" if u.state_round else "no state (lost or never saved)"
            log.warning("federated round %d: site '%s' trained from %s, but the last update of it the run kept is "
                        "from round %s: this run no longer continues exactly as an uninterrupted one", rnd, u.site,
                        what, expected or "none")
        kept_rounds[u.site] = rnd


def record_choice(sampler: SiteSampler, rnd: int, selected: list[tuple[int, str]], record: Recorder) -> None:
    """``sampling.method: loss`` or ``adaptive``: record, for each site the round chose
    among (loss: the candidates; adaptive: every training site), whether it was chosen
    (metric ``chosen``, 1 or 0), so that the run shows who was picked over whom.
    ``unbiased``: record each drawn site's slots (``multiplicity``) and its chance of
    filling one (``chance``)."""
    picked = {s for _, s in selected}
    for site in sampler.considered(rnd):
        record(rnd, Arm.FEDERATED.value, site, "train", CHOSEN, 1.0 if site in picked else 0.0)
    for site, multiplicity, chance in sampler.slots(rnd):  # unbiased: each drawn site's slots and chance of one
        record(rnd, Arm.FEDERATED.value, site, "train", MULTIPLICITY, float(multiplicity))
        record(rnd, Arm.FEDERATED.value, site, "train", CHANCE, chance)


def record_answers(sampler: SiteSampler, rnd: int, updates: Sequence[Update], record: Recorder) -> None:
    """``sampling.method: unbiased``: count who of the round's drawn sites answered (an
    accepted update) and record, per drawn site, whether it did (metric ``answered``, 1 or
    0) and, when it did, its local steps (``steps``), from which a resume rebuilds them."""
    for site, answered, steps in sampler.observe_answers(rnd, updates):
        record(rnd, Arm.FEDERATED.value, site, "train", ANSWERED, 1.0 if answered else 0.0)
        if steps is not None:
            record(rnd, Arm.FEDERATED.value, site, "train", STEPS, float(steps))


def stopped_early(ledger: "PrivacyLedger | None", last: int, rounds: int) -> None:
    """Log that training stopped after round ``last`` of ``rounds`` for the privacy budget."""
    if ledger is not None and last < rounds:
        log.warning(
            "federated training stopped after round %d of %d: round %d would pass the privacy budget "
            "(epsilon %.3g > max_epsilon %g, %s)", last, rounds, last + 1, ledger.epsilon(last + 1),
            ledger.max_epsilon, ledger.what,
        )


def mean_loss(updates: Sequence[Update]) -> float | None:
    n = sum(u.num_examples for u in updates)
    losses = [(u.metrics.get(Metric.LOSS), u.num_examples) for u in updates]
    if n == 0 or any(v is None for v, _ in losses):
        return None
    return sum(v * k for v, k in losses) / n
