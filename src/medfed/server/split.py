"""Split learning (``topology: {kind: split}``), read top to bottom like the server's round
loop (server/loop.py), over the same :class:`Federation`.

The network is cut in three (medfed/cut.py): each site holds the front and the back (with
the loss), the server the middle. A site trains its parts batch by batch against the
server's middle through a :class:`~medfed.site.split.SplitChannel` (site/split.py): only the
activations at the cut and the gradients at the back's input cross, never images or labels.
The server's end of one site's turn is a :class:`MiddleSession`.

Without the U (``u_shaped: false``, vanilla split learning) the network is cut in two: the
site holds the front only, the server everything after the cut and the loss. Per batch the
site sends the activations at the cut and the batch's labels, the server computes the loss,
steps its layers and returns the gradient at the cut (:meth:`MiddleSession.step`); the loss
recorded for a site's turn is then the server's. The labels leave the site: the run says
so in its log and the topology's label (docs/privacy.md).

- ``parallel: false``, sequential split learning: the round's sites take turns on the one
  middle, each starting from the site parts the previous one passed on (the model travels
  as in cyclical weight transfer, server/cyclic.py); the round's model is the last site's
  parts with the middle as it left it.
- ``parallel: true``, SplitFed v1 (Thapa et al., "SplitFed: When Federated Learning Meets
  Split Learning", AAAI 2022, Algorithm 1): every site of the round starts from the round's
  site parts, and the server trains one copy of the middle per site, from the round's
  middle; at the end of the round the fed server averages the site parts and the main
  server the middle copies, both example-weighted. The average of the parts is the average
  of the whole models, so it is computed once by the algorithm's rule (FedAvg). In a
  simulation the sites take their turns one after another, in a deployment at once, which
  changes nothing: no site sees another's training within a round. (SplitFed v2 would train one middle on the sites
  in turn; not built.)

The round's whole model (the parts put together) is evaluated at every site through the
usual path (transport.evaluate), so metrics, tables and the report are those of the other
topologies. Per site and round the bytes crossing the cut are recorded: ``bytes_sent``
(activations, gradients, and the site parts passed on: to the next site in sequence, to
the averaging server in SplitFed) and ``bytes_received`` (the middle's outputs, the
gradients at the cut, the site parts received).

Where the sites take their turns is a :class:`Turns`: in this process
(:class:`InProcessTurns`, ``transport: inprocess``; the job refuses the other simulation
transports) or, in a deployment, over the mutual-TLS service (server/split_deployed.py: each
turn a fit task, the per-batch exchange a ``Split`` call the site opens). The loop is the
same: in sequence one turn at a time on the one middle; SplitFed all the round's turns in
one call, each with its own copy of the middle (the deployment runs them at once).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from medfed.core.errors import MedfedError, RoundError
from medfed.core.params import nbytes
from medfed.config import SplitTopology
from medfed.core.types import Arm, Metric, Params, RoundPlan, Spec, TrainSettings, Update
from medfed.cut import ModelCut, cut_model
from medfed.server.federation import Federation
from medfed.server.loop import (
    Recorder,
    RoundCallback,
    RoundSummary,
    evaluate_round,
    make_plan,
    mean_loss,
    record_choice,
)
from medfed.server.validate import update_problem
from medfed.site.split import InProcessChannel, fit_split, optimizer_for
from medfed.tracking.metrics import MEAN_SITE
from medfed.transport.base import Transport, describe_exception

if TYPE_CHECKING:
    from medfed.site.app import SiteApp

log = logging.getLogger("medfed")

BYTES_RECEIVED = "bytes_received"  # tensor bytes a site received: the middle's outputs, gradients, site parts


class MiddleSession:
    """The server's end of one site's turn: the middle of the network, trained batch by
    batch with a fresh optimizer of the round's settings (as the site's own). It answers
    the two calls of a :class:`~medfed.site.split.SplitChannel` in order; with ``loss``
    (the task's, without the U) the one call of a :class:`~medfed.site.split.LabelChannel`
    instead, and keeps the turn's losses (``steps``, ``mean_loss``)."""

    def __init__(self, middle: nn.Module, settings: TrainSettings, device: torch.device,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.middle, self.device, self.loss = middle, device, loss
        self.optimizer = optimizer_for(middle, settings)  # None: the middle has no weights to train
        middle.train()
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self.steps, self._loss_sum = 0, 0.0

    @property
    def mean_loss(self) -> float:
        """The mean of the losses this session computed (without the U)."""
        return self._loss_sum / max(self.steps, 1)

    def step(self, activations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Without the U: run the rest of the network on ``activations``, the task's loss
        against ``labels``, backward and a step; the gradient at the cut."""
        if self.loss is None:
            raise RoundError("split learning: labels arrived in a U-shaped split, where the loss is the site's")
        given = activations.to(self.device).requires_grad_()
        self.middle.zero_grad(set_to_none=True)
        loss = self.loss(self.middle(given), labels.to(self.device))
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        if given.grad is None:
            raise RoundError("split learning: the loss does not depend on the activations sent")
        self.steps += 1
        self._loss_sum += float(loss.detach())
        return given.grad

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        self._input = activations.to(self.device).requires_grad_()
        self._output = self.middle(self._input)
        return self._output.detach()

    def backward(self, gradient: torch.Tensor) -> torch.Tensor:
        if self._input is None or self._output is None:
            raise RoundError("split learning: a gradient arrived before the activations of its batch")
        self.middle.zero_grad(set_to_none=True)
        self._output.backward(gradient.to(self.device))
        if self.optimizer is not None:
            self.optimizer.step()
        below = self._input.grad
        self._input = self._output = None
        if below is None:
            raise RoundError("split learning: the middle's output does not depend on the activations sent")
        return below


@dataclass
class Turn:
    """One site's turn: train the site's parts ``params`` by ``plan`` against ``session``
    (the server's middle); the parts that come back must fit ``spec``."""

    site: str
    params: Params
    plan: RoundPlan
    session: MiddleSession
    spec: Spec


@dataclass
class Outcome:
    """How a turn ended: the site's trained parts (checked against the turn's spec), or
    why not (``problem``); the tensor bytes the site sent across the cut (activations,
    gradients at the back's input) and received (the middle's outputs, gradients at the
    cut)."""

    update: Update | None
    problem: str | None
    sent: int = 0
    received: int = 0


class Turns(Protocol):
    """Where the sites take their turns: in this process (:class:`InProcessTurns`) or over
    the deployment's gRPC service (server/split_deployed.py)."""

    def run(self, turns: Sequence[Turn]) -> list[Outcome]:
        """Run ``turns`` (at once where the sites can: each has a session of its own) and
        return their outcomes in order; a site's failure is an outcome, never raised."""
        ...


class InProcessTurns:
    """The sites' turns in this process: each site's :func:`fit_split` talks to the
    server's session through an :class:`InProcessChannel`, one turn after another."""

    def __init__(self, apps: dict[str, SiteApp], topology: SplitTopology):
        self.apps, self.topology = apps, topology

    def run(self, turns: Sequence[Turn]) -> list[Outcome]:
        out = []
        for t in turns:
            channel = InProcessChannel(t.session)
            try:
                update = fit_split(self.apps[t.site], t.params, t.plan, channel, self.topology.cut, self.topology.head,
                                   u_shaped=self.topology.u_shaped)
                problem = update_problem(update, t.spec, t.plan.round)
            except Exception as e:  # one site's failure must not stop the federation
                update, problem = None, describe_exception(e)
            out.append(Outcome(update if problem is None else None, problem, channel.sent, channel.received))
        return out


def in_process_sites(transport: Transport) -> dict[str, SiteApp]:
    """The sites of an in-process transport, which the server's middle talks to directly."""
    from medfed.transport.inprocess import InProcessTransport

    if not isinstance(transport, InProcessTransport):
        raise MedfedError(f"topology.kind: split runs its per-batch exchange in this process or in a deployment "
                          f"(medfed server), not over {type(transport).__name__}; use transport: inprocess")
    return transport.apps


def run_split(
    federation: Federation,
    transport: Transport,
    init_params: Params,
    record: Recorder,
    on_round: RoundCallback | None = None,
    start_round: int = 1,
    turns: Turns | None = None,
    network: nn.Module | None = None,
) -> Params:
    """Run rounds ``start_round`` .. ``job.rounds`` of split learning from ``init_params``
    (the whole network's state dict); return the last round's whole model. ``turns``:
    where the sites train against the middle (default: :class:`InProcessTurns` over the
    in-process transport's sites); ``network``: the server's copy of the network, of
    which only the middle is used (default: a copy of an in-process site's). A site that
    fails is skipped (logged): in sequence the next one goes on from the last parts that
    came back and from the middle as it was before the failed turn; a round in which every
    site fails is a RoundError. A cut the network cannot take is a ConfigError naming
    ``topology.cut`` before round 1. SplitFed holds to the job's quorum (``min_sites``), as
    FedAvg does."""
    job, algorithm, incoming, sampler = federation.job, federation.algorithm, federation.incoming, federation.sampler
    topology = job.topology
    if not isinstance(topology, SplitTopology):
        raise ValueError(f"run_split: topology.kind is {topology.kind}, not split")
    parallel = topology.parallel
    if turns is None or network is None:
        apps = in_process_sites(transport)
        turns = turns or InProcessTurns(apps, topology)
        network = network or apps[job.training_sites[0]].model
    server_model = copy.deepcopy(network)  # the server's own network: only its middle is ever used
    parts = cut_model(server_model, topology.cut, topology.head, topology.u_shaped)
    device = next(iter(server_model.parameters()), torch.empty(0)).device
    sites = list(job.site_names)
    kind = "SplitFed v1" if parallel else "sequential split learning"
    log.info("split learning: the sites keep %d entries, the server %d (%s)",
             len(parts.site_keys), len(parts.middle_keys), kind)
    loss = None
    if not topology.u_shaped:  # the server holds the loss: the sites' labels come to it
        from medfed.tasks import build_task

        loss = build_task(job).loss
        log.warning("split learning without the U (topology.u_shaped: false): every training batch's labels go to "
                    "the server with its activations; the server computes the loss (docs/privacy.md)")
    model = init_params
    pinned = {k: init_params[k] for k in federation.frozen if k in init_params}
    for rnd in range(start_round, job.rounds + 1):
        # ---- 1. the round's sites
        selected = sampler.select(rnd)
        record_choice(sampler, rnd, selected, record)
        log.info("split round %d/%d (%s) started: %s", rnd, job.rounds, kind, ", ".join(s for _, s in selected))
        record(rnd, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.MODEL_BYTES, nbytes(model))

        # ---- 2. each site trains its parts against the middle, batch by batch: in sequence
        # on the one middle, or (SplitFed) all from the round's start, each on a copy of it
        start, t0 = model, time.perf_counter()
        trained: list[Update] = []
        failed: list[str] = []
        spec = incoming.spec(start, parts.middle_keys)
        waves = [selected] if parallel else [[s] for s in selected]
        for wave in waves:
            begin = model
            middles = [copy.deepcopy(parts.middle) if parallel else parts.middle for _ in wave]
            batch = []
            for (i, site), middle in zip(wave, middles):
                middle.load_state_dict({k: begin[k] for k in parts.middle_keys}, strict=False)
                plan = make_plan(job, job.job_id, Arm.FEDERATED, rnd, i)
                batch.append(Turn(site, {k: begin[k] for k in parts.site_keys}, plan,
                                  MiddleSession(middle, plan.train, device, loss), spec))
            for turn, outcome in zip(batch, turns.run(batch)):
                whole = _after_turn(turn, outcome, begin, parts, pinned, record)
                if whole is None:
                    failed.append(turn.site)
                    if not parallel:  # the middle as it was before the failed turn
                        parts.middle.load_state_dict({k: begin[k] for k in parts.middle_keys}, strict=False)
                    continue
                trained.append(whole)
                if not parallel:
                    model = whole.params
        log.info("split round %d: the sites' turns took %.3f s", rnd, time.perf_counter() - t0)
        if not trained:
            raise RoundError(f"split round {rnd}: every site failed ({', '.join(failed)}); no model to go on from")
        if parallel and len(trained) < job.quorum:  # SplitFed averages like FedAvg: the same quorum
            raise RoundError(f"split round {rnd}: only {len(trained)} site(s) trained, the quorum is {job.quorum} "
                             f"(failed: {', '.join(failed)})")
        if parallel:  # the fed server averages the site parts, the main server the middle copies
            merged = algorithm.aggregate(start, trained)
            model = {**merged, **pinned} if pinned else merged
        sampler.observe(trained)

        # ---- 3. evaluate the round's whole model at every site
        means: dict[str, dict[str, float | None]] = {}
        if rnd % job.eval_every == 0 or rnd == job.rounds:
            means = evaluate_round(transport, {s: model for s in sites}, job, Arm.FEDERATED, rnd, record)

        # ---- 4. report the round (the caller checkpoints and tracks the best model)
        if on_round is not None:
            on_round(RoundSummary(Arm.FEDERATED, rnd, mean_loss(trained), means, failed), model)
        log.info("split round %d/%d done (%d sites trained, %d failed)", rnd, job.rounds, len(trained), len(failed))
    return model


def _after_turn(turn: Turn, outcome: Outcome, begin: Params, parts: ModelCut, pinned: Params,
                record: Recorder) -> Update | None:
    """The whole model after ``turn`` (the site's parts that came back, the middle of its
    session, the job's frozen entries ``pinned`` at their start) as an update of the site,
    its bytes and loss recorded; None when the site failed (logged)."""
    rnd, site = turn.plan.round, turn.site
    if outcome.update is None:
        log.warning("split round %d: site '%s' skipped: %s", rnd, site, outcome.problem)
        return None
    update = outcome.update
    metrics = update.metrics
    if turn.session.loss is not None:  # without the U the loss is the server's, not the site's
        metrics = {**metrics, Metric.LOSS: turn.session.mean_loss}
    trained = {k: update.params[k].detach().to("cpu", copy=True) for k in parts.site_keys}
    middle = turn.session.middle.state_dict()
    whole = {k: pinned.get(k, trained[k] if k in parts.site_keys else
                           middle[k].detach().to("cpu", copy=True) if k in middle else begin[k]) for k in begin}
    parts_bytes = nbytes(trained)  # passed on: to the next site, or to the averaging server
    record(rnd, Arm.FEDERATED.value, site, "train", Metric.BYTES_SENT, outcome.sent + parts_bytes)
    record(rnd, Arm.FEDERATED.value, site, "train", BYTES_RECEIVED, outcome.received + nbytes(turn.params))
    record(rnd, Arm.FEDERATED.value, site, "train", Metric.LOSS, metrics.get(Metric.LOSS))
    return Update(site=site, round=rnd, params=whole, num_examples=update.num_examples,
                  num_steps=update.num_steps, metrics=metrics)
