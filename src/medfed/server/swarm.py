"""Swarm learning (``topology: {kind: swarm}``): the sites merge models among themselves,
read top to bottom like the server's round loop (server/loop.py), over the same
:class:`Federation`.

Each round every site of the round trains from its own model; then, by ``merge``:
``leader`` (one elected site merges everyone's: with all merging, FedAvg), ``gossip``
(each site merges with ``peers`` drawn for it) or ``braintorrent`` (one drawn site merges
with the peers that trained since its last merge). A merge is the algorithm's server rule
(the example-weighted mean, or the job's robust rule) applied by the merging site to the
models it pulled, starting from its own.

In simulation this process plays every site. Per-site models (``gossip``,
``braintorrent``) are evaluated each on its own site (arm ``personalized``) and their
consensus at every site (arm ``federated``), with their spread
(:data:`CONSENSUS_DISTANCE`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfed.algorithms.mean import weighted_average
from medfed.core import payload
from medfed.core.errors import CodecError, RunDirError
from medfed.core.files import replacing
from medfed.core.params import delta, l2_norm, nbytes
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

CONSENSUS_DISTANCE = "consensus_distance"  # mean L2 distance of the sites' models to their consensus
_LEADER_STREAM, _PEER_STREAM, _MERGER_STREAM = 6_421, 6_427, 6_449  # apart from the sampler's draws


def elect_leader(candidates: list[str], how: str, seed: int, rnd: int, all_sites: list[str]) -> str:
    """The round's leader among the sites that trained: a seeded draw (``random``), or the
    training sites in turn (``round_robin``, passing over one that did not train)."""
    if how == "random":
        return candidates[int(np.random.default_rng([seed, _LEADER_STREAM, rnd]).integers(len(candidates)))]
    start = (rnd - 1) % len(all_sites)
    turn = all_sites[start:] + all_sites[:start]
    return next(s for s in turn if s in candidates)


def draw_peers(site: str, candidates: list[str], k: int, seed: int, rnd: int, index: int) -> list[str]:
    """The ``k`` peers (fewer when fewer trained) ``site`` merges with in round ``rnd``: a
    seeded draw among the other sites that trained."""
    others = [c for c in candidates if c != site]
    rng = np.random.default_rng([seed, _PEER_STREAM, rnd, index])
    picked = rng.choice(len(others), size=min(k, len(others)), replace=False) if others else []
    return [others[i] for i in sorted(int(i) for i in picked)]


def consensus(models: dict[str, Params], weights: dict[str, float]) -> Params:
    """The example-weighted mean of the sites' models."""
    names = list(models)
    return weighted_average([models[n] for n in names], [weights[n] for n in names])


def spread(models: dict[str, Params], centre: Params) -> float:
    """The mean over sites of the L2 distance from a site's model to ``centre``."""
    return sum(l2_norm(delta(m, centre)) for m in models.values()) / len(models)


def run_swarm(
    federation: Federation,
    transport: Transport,
    init_params: Params,
    record: Recorder,
    on_round: RoundCallback | None = None,
    start_round: int = 1,
    state_dir: Path | None = None,
) -> Params:
    """Run rounds ``start_round`` .. ``job.rounds`` of swarm learning from ``init_params``;
    return the final merged model (``leader``) or the sites' consensus (``gossip``,
    ``braintorrent``). ``state_dir``: where the loop saves its state after every round
    (:class:`SwarmState`), and, when ``start_round`` > 1, finds the state it goes on from."""
    job, algorithm, incoming, sampler = federation.job, federation.algorithm, federation.incoming, federation.sampler
    topology = job.topology
    merge = topology.merge  # type: ignore[union-attr]
    sites, training = list(job.site_names), list(job.training_sites)
    job_id = job.job_id
    pinned = {k: init_params[k] for k in federation.frozen if k in init_params}
    job_hash = job.job_hash() if state_dir is not None else ""
    if start_round > 1 and state_dir is not None:  # a resumed run: the state after the last saved round
        state = SwarmState.load(state_dir, start_round - 1, job_hash, list(init_params))
    else:
        state = SwarmState.start(training, init_params)
    models = state.models  # each site's own model
    sizes = state.sizes  # training examples per site, from its updates
    latest = state.latest  # braintorrent: each site's last trained model
    version = state.version  # braintorrent: how many times each site has trained
    seen = state.seen  # braintorrent: versions each site merged
    result = init_params
    ledger = federation.ledger  # DP-SGD: epsilon after each round, the last round the budget allows
    last = job.rounds if ledger is None else min(job.rounds, ledger.last_round)
    for rnd in range(start_round, last + 1):
        # ---- 1. every site of the round trains from its own model
        selected = sampler.select(rnd)
        record_choice(sampler, rnd, selected, record)
        log.info("swarm round %d/%d (%s) started: %s", rnd, job.rounds, merge, ", ".join(s for _, s in selected))
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.MODEL_BYTES, nbytes(init_params))
        requests = [
            FitRequest(site=s, params=models[s], expect=incoming.spec(models[s], algorithm.local_keys),
                       encoding=incoming.encoding,
                       plan=make_plan(job, job_id, Arm.FEDERATED, rnd, i, algorithm.round_extras(models[s])))
            for i, s in selected
        ]
        answers = transport.fit(requests, timeout=job.round_timeout)
        quorum = job.quorum if merge == "leader" else 1
        updates, failed = collect_updates(answers, init_params, rnd, quorum, Arm.FEDERATED, algorithm, incoming)
        del answers
        trained = {u.site: u for u in updates}
        sampler.observe(updates)
        for u in updates:
            record(rnd, Arm.FEDERATED.value, u.site, "train", Metric.LOSS, u.metrics.get(Metric.LOSS))
            sizes[u.site] = float(u.num_examples)
        sent = dict.fromkeys(trained, 0)  # bytes each site sent to its peers this round

        # ---- 2. merge among the sites
        if merge == "leader":
            leader = elect_leader(list(trained), topology.leader, job.seed, rnd, training)  # type: ignore[union-attr]
            merged = _pinned(algorithm.aggregate(models[leader], updates), pinned)
            for s, u in trained.items():  # everyone sends to the leader, the leader sends the merge back
                sent[s] = nbytes(u.params) if s != leader else nbytes(merged) * (len(training) - 1)
            models = {s: merged for s in training}
            log.info("swarm round %d: site '%s' led the merge of %d model(s)", rnd, leader, len(updates))
        elif merge == "gossip":
            merged_by: dict[str, Params] = {}
            for s in trained:
                peers = draw_peers(s, list(trained), topology.peers, job.seed, rnd, sites.index(s))  # type: ignore[union-attr]
                group = [trained[x] for x in training if x == s or x in peers]
                merged_by[s] = _pinned(algorithm.aggregate(models[s], group), pinned)
                for p in peers:
                    sent[p] += nbytes(trained[p].params)
            models.update(merged_by)
        else:  # braintorrent
            for s, u in trained.items():
                models[s] = _pinned({k: u.params.get(k, v) for k, v in models[s].items()}, pinned)
                latest[s], version[s] = u, version[s] + 1
            merger = list(trained)[int(np.random.default_rng([job.seed, _MERGER_STREAM, rnd]).integers(len(trained)))]
            changed = [p for p in training if p != merger and p in latest and version[p] > seen[merger][p]]
            group = [latest[x] for x in training if x == merger or x in changed]
            models[merger] = _pinned(algorithm.aggregate(models[merger], group), pinned)
            for p in changed:
                seen[merger][p] = version[p]
                sent[p] += nbytes(latest[p].params)
            log.info("swarm round %d: site '%s' merged with %d peer(s) that trained since its last merge",
                     rnd, merger, len(changed))
        for s, n in sent.items():
            record(rnd, Arm.FEDERATED.value, s, "train", Metric.BYTES_SENT, n)

        # ---- 3. evaluate: the merge at every site, or each site's own model and their consensus
        means: dict[str, dict[str, float | None]] = {}
        if merge == "leader":
            result = models[training[0]]
        else:
            weights = {s: sizes.get(s, 1.0) for s in training}
            result = consensus(models, weights)
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", CONSENSUS_DISTANCE, spread(models, result))
        eps = ledger.epsilon(rnd) if ledger is not None else None
        if eps is not None:
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.EPSILON, eps)
        if rnd % job.eval_every == 0 or rnd == last:
            means = evaluate_round(transport, {s: result for s in sites}, job, Arm.FEDERATED, rnd, record)
            if merge != "leader":
                evaluate_round(transport, dict(models), job, Arm.FEDERATED, rnd, _as_personal(record))

        # ---- 4. save the swarm's state, then report the round (the caller checkpoints and tracks the best model)
        if state_dir is not None:
            SwarmState(models, sizes, latest, version, seen).save(state_dir, rnd, job_hash)
        if on_round is not None:
            on_round(RoundSummary(Arm.FEDERATED, rnd, mean_loss(updates), means, failed, eps), result)
        log.info("swarm round %d/%d done (%d sites trained, %d failed)", rnd, job.rounds, len(updates), len(failed))
        del updates
    stopped_early(ledger, last, job.rounds)
    return result


def _pinned(params: Params, pinned: Params) -> Params:
    """``params`` with the job's frozen parameters at their starting values."""
    return {**params, **{k: v for k, v in pinned.items() if k in params}} if pinned else params


def _as_personal(record: Recorder) -> Recorder:
    """``record`` with the arm written as ``personalized``: each site's own model."""
    def relabelled(rnd: int, arm: str, site: str, split: str, metric: str, value: float | None) -> None:
        record(rnd, Arm.PERSONALIZED.value, site, split, metric, value)

    return relabelled



SWARM_STATE = "swarm-state-{round}.safetensors"  # in a simulation's staging folder, the last two rounds


@dataclass
class SwarmState:
    """What the swarm's loop carries from round to round: each training site's own model,
    the examples each trained on, and BrainTorrent's last trained update of each site, how
    many times each has trained and which versions each merged. Saved with every round
    (``SWARM_STATE``) so that ``medfed run --resume`` goes on exactly."""

    models: dict[str, Params]
    sizes: dict[str, float] = field(default_factory=dict)
    latest: dict[str, Update] = field(default_factory=dict)
    version: dict[str, int] = field(default_factory=dict)
    seen: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def start(cls, training: list[str], init_params: Params) -> SwarmState:
        return cls({s: init_params for s in training}, {}, {}, {s: 0 for s in training},
                   {s: {p: 0 for p in training} for s in training})

    def save(self, folder: Path, rnd: int, job_hash: str) -> None:
        """Write the state after round ``rnd`` (atomically) and drop the one of two rounds
        before: the resume point, saved after this, is of this round or the one before."""
        groups: dict[str, Params] = {}
        refs: dict[str, str] = {}
        by_id: dict[int, str] = {}
        for i, (site, m) in enumerate(self.models.items()):  # the leader's merge is one model for all: once
            refs[site] = by_id.setdefault(id(m), f"m{i}")
            groups.setdefault(refs[site], m)
        for i, (site, u) in enumerate(self.latest.items()):
            groups[f"l{i}"] = u.params
        meta = {"round": rnd, "job_hash": job_hash, "models": refs, "sizes": self.sizes, "version": self.version,
                "seen": self.seen,
                "latest": {site: [f"l{i}", u.round, u.num_examples, u.num_steps, u.metrics.get(Metric.LOSS)]
                           for i, (site, u) in enumerate(self.latest.items())}}
        with replacing(folder / SWARM_STATE.format(round=rnd)) as tmp:
            tmp.write_bytes(bytes(payload.pack(groups, meta)))
        (folder / SWARM_STATE.format(round=rnd - 2)).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, rnd: int, job_hash: str, order: list[str]) -> SwarmState:
        """The state saved after round ``rnd``, each model's entries in ``order`` (the
        model's: a sum over the entries, such as a norm, adds them as the run never stopped
        did); RunDirError when it is missing or of another job."""
        path = folder / SWARM_STATE.format(round=rnd)
        try:
            groups, meta = payload.unpack(path.read_bytes(), str(path))
            groups = {g: {k: ts[k] for k in order if k in ts} for g, ts in groups.items()}
            if meta.get("round") != rnd or meta.get("job_hash") != job_hash:
                raise CodecError(f"it is of round {meta.get('round')} of job {meta.get('job_hash')}")
            models = {site: groups[ref] for site, ref in meta["models"].items()}
            latest = {site: Update(site, r, groups[ref], n, steps, {Metric.LOSS: loss} if loss is not None else {})
                      for site, (ref, r, n, steps, loss) in meta["latest"].items()}
            return cls(models, dict(meta["sizes"]), latest, dict(meta["version"]), dict(meta["seen"]))
        except (OSError, CodecError, KeyError, TypeError, ValueError) as e:
            raise RunDirError(f"cannot read the swarm's state after round {rnd} in '{path}': {e}; run the job again "
                              "without --resume") from None


def forget_swarm_states(folder: Path) -> None:
    """Remove the swarm's saved states (a finished run needs none)."""
    for f in folder.glob(SWARM_STATE.format(round="*")):
        f.unlink(missing_ok=True)
