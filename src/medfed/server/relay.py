"""Cyclic and swarm topologies when the server only relays (a deployment): it keeps the
schedule, passes on sealed models it cannot read or alter, and records what it relayed;
only sites hold models (site/peers.py answers these messages).

The schedule is the simulation's, draw for draw (server/cyclic.py, server/swarm.py: the
visiting order, the leader, the peers, the merging site), and each site computes what the
simulation computes for it, so a deployment gives the metrics of its simulation:

* cyclic: each site of the round trains from the model the previous one sealed for the
  sites of the job, and seals what it passes on; the last model that came back is the
  round's, which every site evaluates; the server keeps it, sealed, for the next round and
  for ``--resume``.
* swarm ``leader``: every site trains from its own model; the others seal their trained
  model for the leader, which merges and seals the merge for every site; each site adopts
  it.
* ``gossip``: each peer seals its trained model for the sites that drew it; each site
  merges. ``braintorrent``: each trained site adopts what it trained; the peers that
  changed since the merging site's last merge seal their last trained model for it.
  In evaluated rounds each training site seals its own model for every site, and each
  site evaluates the consensus (the example-weighted mean of these models) and its own,
  and reports its own model's distance to the consensus.

Every sealed model's label (sender, job, round, purpose, examples, recipients) is checked
before it is passed on; the log shows each relayed model's size and SHA-256
(server/relay_channel.py: :class:`Relay`, and :class:`RelayState`, what the server keeps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medfed.core import codec
from medfed.core.errors import RoundError
from medfed.core.params import nbytes
from medfed.core.types import Arm, Metric, Params, SiteFailure, Update
from medfed.server.cyclic import visiting_order
from medfed.server.federation import Federation
from medfed.server.loop import Recorder, RoundCallback, RoundSummary, make_plan, mean_loss, record_choice, stopped_early
from medfed.server.relay_channel import (
    RELAY_STATE,
    Relay,
    RelayState,
    check_relayable,
    init_start,
    sealed_start,
)
from medfed.server.swarm import _MERGER_STREAM, CONSENSUS_DISTANCE, draw_peers, elect_leader
from medfed.site.peers import ADOPT, FIT, MERGE, MERGED, OWN, PASSED_ON, SEAL, TRAINED
from medfed.tracking.metrics import MEAN_SITE
from medfed.transport.pki.sealing import Envelope

log = logging.getLogger("medfed")

__all__ = ["RELAY_STATE", "Relay", "RelayState", "init_start", "run_cyclic_relayed", "run_swarm_relayed",
           "sealed_start"]

def run_cyclic_relayed(
    federation: Federation, relay: Relay, init_params: Params, record: Recorder,
    on_round: RoundCallback | None = None, state: RelayState | None = None,
    on_state: Callable[[RelayState], None] | None = None,
) -> RelayState:
    """Rounds ``state.done + 1`` .. ``job.rounds`` of cyclical weight transfer relayed
    between the sites (see the module's docstring); the state after the last."""
    job, sampler, ledger = federation.job, federation.sampler, federation.ledger
    check_relayable(federation, init_params)
    state = state or RelayState()
    sites = list(job.site_names)
    start = state.carried or init_start(init_params)
    last = job.rounds if ledger is None else min(job.rounds, ledger.last_round)
    for rnd in range(state.done + 1, last + 1):
        selected = sampler.select(rnd)
        record_choice(sampler, rnd, selected, record)
        visits = visiting_order(selected, job.topology.order, job.seed, rnd)  # type: ignore[union-attr]
        log.info("cyclic round %d/%d started (relayed): %s", rnd, job.rounds, " -> ".join(s for _, s in visits))
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.MODEL_BYTES, nbytes(init_params))
        trained: list[Update] = []
        failed: list[str] = []
        for i, site in visits:
            plan = make_plan(job, job.job_id, Arm.FEDERATED, rnd, i)
            answer = relay.send(FIT, rnd, {site: {"plan": codec.plan_to_dict(plan), "start": start,
                                                  "seal": relay.to(sites)}})[site]
            got = relay.receipt(site, answer, rnd)
            env = relay.envelope(site, answer, rnd, PASSED_ON, sites) if isinstance(got, Update) else got
            if isinstance(env, str) or isinstance(got, str):
                failed.append(site)
                log.warning("cyclic round %d: site '%s' skipped (%s); the model goes on from %s", rnd, site, env,
                            f"site '{trained[-1].site}'" if trained else "the round's start")
                continue
            record(rnd, Arm.FEDERATED.value, site, "train", Metric.BYTES_SENT, env.size)
            record(rnd, Arm.FEDERATED.value, site, "train", Metric.LOSS, got.metrics.get(Metric.LOSS))
            start = sealed_start(env)
            trained.append(got)
            sampler.observe([got])
        if not trained:
            raise RoundError(f"cyclic round {rnd}: every site failed ({', '.join(failed)}); no model to go on from")
        means: dict[str, dict[str, float | None]] = {}
        eps = ledger.epsilon(rnd) if ledger is not None else None
        if eps is not None:
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.EPSILON, eps)
        if rnd % job.eval_every == 0 or rnd == last:
            means, _ = relay.evaluate({s: {"model": start} for s in sites}, rnd, record)
        state.done, state.carried = rnd, start
        if on_state is not None:
            on_state(state)
        if on_round is not None:
            on_round(RoundSummary(Arm.FEDERATED, rnd, mean_loss(trained), means, failed, eps), {})
        log.info("cyclic round %d/%d done (%d sites, %d skipped)", rnd, job.rounds, len(trained), len(failed))
    stopped_early(ledger, last, job.rounds)
    return state


def run_swarm_relayed(
    federation: Federation, relay: Relay, init_params: Params, record: Recorder,
    on_round: RoundCallback | None = None, state: RelayState | None = None,
    on_state: Callable[[RelayState], None] | None = None,
) -> RelayState:
    """Rounds ``state.done + 1`` .. ``job.rounds`` of swarm learning relayed between the
    sites (see the module's docstring); the state after the last."""
    job, sampler, ledger = federation.job, federation.sampler, federation.ledger
    check_relayable(federation, init_params)
    topology = job.topology
    merge = topology.merge  # type: ignore[union-attr]
    sites, training = list(job.site_names), list(job.training_sites)
    state = state or RelayState()
    if not state.joined:  # every training site starts from the initial model
        joined = relay.send(ADOPT, state.done, {s: {"start": init_start(init_params)} for s in training})
        lost = [s for s, a in joined.items() if isinstance(a, SiteFailure)]
        if lost:
            log.warning("swarm: site(s) %s did not take the initial model: they cannot train until they do",
                        ", ".join(lost))
        state.joined = True
    for s in training:
        state.version.setdefault(s, 0)
        state.seen.setdefault(s, {p: 0 for p in training})
    last = job.rounds if ledger is None else min(job.rounds, ledger.last_round)
    for rnd in range(state.done + 1, last + 1):
        # ---- 1. every site of the round trains from its own model
        selected = sampler.select(rnd)
        record_choice(sampler, rnd, selected, record)
        log.info("swarm round %d/%d (%s, relayed) started: %s", rnd, job.rounds, merge,
                 ", ".join(s for _, s in selected))
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.MODEL_BYTES, nbytes(init_params))
        bodies = {s: {"plan": codec.plan_to_dict(make_plan(job, job.job_id, Arm.FEDERATED, rnd, i)),
                      "start": {"from": "own"}, "seal": None, "adopt": merge == "braintorrent"}
                  for i, s in selected}
        answers = relay.send(FIT, rnd, bodies)
        trained: dict[str, Update] = {}
        failed: list[str] = []
        for _, s in selected:
            got = relay.receipt(s, answers[s], rnd)
            if isinstance(got, str):
                failed.append(s)
                log.warning("federated round %d: site '%s' left out: %s", rnd, s, got)
            else:
                trained[s] = got
        quorum = job.quorum if merge == "leader" else 1
        if len(trained) < quorum:
            raise RoundError(f"federated round {rnd}: only {len(trained)} site(s) answered, the quorum is {quorum} "
                             f"(failed: {', '.join(failed) or 'none'})")
        updates = list(trained.values())
        sampler.observe(updates)
        for u in updates:
            record(rnd, Arm.FEDERATED.value, u.site, "train", Metric.LOSS, u.metrics.get(Metric.LOSS))
            state.sizes[u.site] = float(u.num_examples)
        sent = dict.fromkeys(trained, 0)

        # ---- 2. merge among the sites, sealed models relayed
        merged: Envelope | None = None
        if merge == "leader":
            leader = elect_leader(list(trained), topology.leader, job.seed, rnd, training)  # type: ignore[union-attr]
            envs = _seal_trained(relay, rnd, {p: [leader] for p in trained if p != leader}, trained, sent)
            group = [_member(x, leader, envs) for x in trained if x == leader or x in envs]
            answer = relay.send(MERGE, rnd, {leader: {"group": group, "seal": relay.to(sites)}})[leader]
            got = relay.envelope(leader, answer, rnd, MERGED, sites)
            if isinstance(got, str):
                raise RoundError(f"swarm round {rnd}: the leader, site '{leader}', did not merge: {got}")
            merged = got
            sent[leader] = merged.size
            log.info("swarm round %d: site '%s' led the merge of %d model(s)", rnd, leader, len(group))
        elif merge == "gossip":
            peers = {s: draw_peers(s, list(trained), topology.peers, job.seed, rnd, sites.index(s))  # type: ignore[union-attr]
                     for s in trained}
            wanted = {p: [s for s in trained if p in peers[s]] for p in trained}
            envs = _seal_trained(relay, rnd, {p: r for p, r in wanted.items() if r}, trained, sent)
            bodies = {s: {"group": [_member(x, s, envs) for x in training
                                    if x == s or (x in peers[s] and x in envs)]} for s in trained}
            relay.send(MERGE, rnd, bodies)
        else:  # braintorrent
            for s in trained:
                state.trained_round[s], state.version[s] = rnd, state.version[s] + 1
            picked = int(np.random.default_rng([job.seed, _MERGER_STREAM, rnd]).integers(len(trained)))
            merger = list(trained)[picked]
            changed = [p for p in training if p != merger and p in state.trained_round
                       and state.version[p] > state.seen[merger][p]]
            envs = _seal_trained(relay, rnd, {p: [merger] for p in changed}, trained, sent, state.trained_round)
            group = [_member(x, merger, envs) for x in training
                     if x == merger or x in envs]
            answer = relay.send(MERGE, rnd, {merger: {"group": group}})[merger]
            if not isinstance(answer, SiteFailure):
                for p in envs:
                    state.seen[merger][p] = state.version[p]
            log.info("swarm round %d: site '%s' merged with %d peer(s) that trained since its last merge",
                     rnd, merger, len(envs))
        for s, n in sent.items():
            record(rnd, Arm.FEDERATED.value, s, "train", Metric.BYTES_SENT, n)

        # ---- 3. evaluate: the merge at every site, or each site's own model and their consensus
        means: dict[str, dict[str, float | None]] = {}
        evaluated = rnd % job.eval_every == 0 or rnd == last
        if merged is not None:  # every training site adopts the merge; every site evaluates it
            start = sealed_start(merged)
            if evaluated:
                means, _ = relay.evaluate({s: {"model": start, "adopt": s in training and s != merged.label.sender}
                                           for s in sites}, rnd, record)
            else:
                relay.send(ADOPT, rnd, {s: {"start": start} for s in training if s != merged.label.sender})
        elif evaluated:
            means = _evaluate_consensus(relay, rnd, sites, training, state, record)
        eps = ledger.epsilon(rnd) if ledger is not None else None
        if eps is not None:
            record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.EPSILON, eps)

        # ---- 4. report the round
        state.done = rnd
        if on_state is not None:
            on_state(state)
        if on_round is not None:
            on_round(RoundSummary(Arm.FEDERATED, rnd, mean_loss(updates), means, failed, eps), {})
        log.info("swarm round %d/%d done (%d sites trained, %d failed)", rnd, job.rounds, len(updates), len(failed))
    stopped_early(ledger, last, job.rounds)
    return state


def _seal_trained(relay: Relay, rnd: int, recipients: dict[str, list[str]], trained: Mapping[str, Update],
                  sent: dict[str, int], rounds: Mapping[str, int] | None = None) -> dict[str, Envelope]:
    """Each site of ``recipients`` seals the model it trained last for the sites listed;
    the sealed models that came back in order (those that did not are logged)."""
    answers = relay.send(SEAL, rnd, {p: {"slot": "trained", "to": relay.to(r)} for p, r in recipients.items()})
    out = {}
    for p, r in recipients.items():
        at = rounds.get(p, rnd) if rounds is not None else rnd
        n = trained[p].num_examples if p in trained else None
        got = relay.envelope(p, answers[p], at, TRAINED, r, n)
        if isinstance(got, str):
            log.warning("swarm round %d: the trained model of site '%s' is left out of the merge: %s", rnd, p, got)
            continue
        out[p] = got
        sent[p] = sent.get(p, 0) + got.size
    return out


def _member(site: str, merging: str, envs: Mapping[str, Envelope]) -> dict[str, Any]:
    """One entry of a merge's group: the merging site itself, or a peer's sealed model."""
    if site == merging:
        return {"site": site, "self": True}
    return {"site": site, "round": envs[site].label.round, "envelope": envs[site].to_wire()}


def _evaluate_consensus(relay: Relay, rnd: int, sites: list[str], training: list[str], state: RelayState,
                        record: Recorder) -> dict[str, dict[str, float | None]]:
    """Each training site seals its own model for every site; every site evaluates their
    consensus, and each training site its own model and its distance to the consensus."""
    answers = relay.send(SEAL, rnd, {s: {"slot": "own", "to": relay.to(sites)} for s in training})
    envs = {}
    for s in training:
        got = relay.envelope(s, answers[s], rnd, OWN, sites)
        if isinstance(got, str):
            log.warning("swarm round %d: the model of site '%s' is left out of the consensus: %s", rnd, s, got)
        else:
            envs[s] = got
    weights = {s: state.sizes.get(s, 1.0) for s in training}
    bodies = {}
    for x in sites:
        members = [{"site": s, "weight": weights[s], **({"self": True} if s == x else {"envelope": envs[s].to_wire()})}
                   for s in training if s in envs]
        bodies[x] = {"model": {"from": "consensus", "members": members}, "personal": x in envs}
    means, distances = relay.evaluate(bodies, rnd, record, one_by_one=True)
    reported = [distances[s] for s in training if s in distances]
    if reported:
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", CONSENSUS_DISTANCE, sum(reported) / len(reported))
    return means
