"""Split learning in a deployment (``medfed server`` with ``topology: {kind: split}``): the
same round loop as in simulation (server/split.py's :func:`run_split`), the sites' turns
over the deployment's service.

A turn is a fit task whose payload is the site's parts of the network (what a model is in
the other topologies) and whose answer is the site's trained parts, checked by the hub as
any update is (names, shapes, dtypes, finite values, the site's example count; see
transport/grpc/intake.py). While the task is open the hub holds a seat for it
(transport/grpc/splitting.py): the site, in its turn, opens a ``Split`` call naming the task
and streams its activations and gradients; the hub answers from the turn's
:class:`~medfed.server.split.MiddleSession`. Sequential split learning hands out one turn at
a time; SplitFed v1 all the round's turns at once, each site with its own copy of the
middle, trained in the hub's request threads in parallel. Without the U each seat also
holds what one example's labels must be (tasks/targets.py), which the hub checks before the
server's loss uses them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from torch import nn

from medfed.config import SplitTopology
from medfed.core.types import Arm, FitRequest, Params, SiteFailure
from medfed.cut import activation_shape, cut_model
from medfed.server.federation import Federation
from medfed.server.loop import Recorder, RoundCallback
from medfed.server.split import Outcome, Turn, run_split
from medfed.site.device import set_threads
from medfed.tasks.targets import TargetSpec, target_spec
from medfed.transport.grpc.splitting import Seat
from medfed.transport.grpc.transport import GrpcTransport


class GrpcTurns:
    """The sites' turns as fit tasks with a seat each (see the module docstring).
    ``activations``: the shape of one example's activations at the cut; ``targets``: one
    example's labels without the U (None: U-shaped)."""

    def __init__(self, transport: GrpcTransport, activations: tuple[int, ...], timeout: float,
                 targets: TargetSpec | None = None):
        self.transport, self.activations, self.timeout, self.targets = transport, activations, timeout, targets
        self._round: tuple[int, float, list[str]] = (0, 0.0, [])  # the round, its start, its sites so far

    def run(self, turns: Sequence[Turn]) -> list[Outcome]:
        if turns and turns[0].plan.round != self._round[0]:
            self._round = (turns[0].plan.round, time.time(), [])
        rnd, started, sites = self._round
        sites.extend(t.site for t in turns)
        seats = [Seat(t.site, Arm.FEDERATED.value, t.plan.round, t.session, self.activations,
                      t.plan.train.batch_size, self.targets) for t in turns]
        for s in seats:
            self.transport.hub.seats.open(s)
        try:
            answers = self.transport.fit([FitRequest(t.site, t.params, t.plan, expect=t.spec) for t in turns],
                                         self.timeout)
        finally:
            for s in seats:
                self.transport.hub.seats.close(s)
        store = self.transport.hub.store
        if store is not None and turns:  # the round's row names every site that took a turn in it, not the last
            store.round_started(Arm.FEDERATED.value, rnd, sites, started)
        out = []
        for answer, seat in zip(answers, seats):  # bytes from the site's side, as the in-process channel counts
            if isinstance(answer, SiteFailure):
                out.append(Outcome(None, answer.cause, seat.received, seat.sent))
            else:
                out.append(Outcome(answer, None, seat.received, seat.sent))
        return out


def run_split_deployed(federation: Federation, transport: GrpcTransport, network: nn.Module,
                       input_shape: tuple[int, ...], init_params: Params, record: Recorder,
                       on_round: RoundCallback | None, start_round: int) -> Params:
    """:func:`run_split` over the deployment's sites. ``network``: the server's model (its
    middle is used), ``input_shape``: one example's (C, spatial...), as the sites reported
    (with ``transforms.patch``, the network sees patches of that size)."""
    topology, patch = federation.job.topology, federation.job.transforms.patch
    assert isinstance(topology, SplitTopology)
    if patch is not None:
        input_shape = (input_shape[0], *patch)
    set_threads(federation.job.num_threads)  # the middle computes with the job's threads, as in simulation
    shape = activation_shape(cut_model(network, topology.cut, topology.head, topology.u_shaped), input_shape)
    targets = None if topology.u_shaped else target_spec(federation.job.task, input_shape)
    turns = GrpcTurns(transport, shape, federation.job.round_timeout, targets)
    return run_split(federation, transport, init_params, record, on_round, start_round, turns=turns, network=network)
