"""The round loop of each topology (``topology.kind``), all over the same
:class:`~medfed.server.federation.Federation` and with the same signature: the server's
(server/loop.py), cyclical weight transfer (server/cyclic.py), swarm learning
(server/swarm.py) and split learning (server/split.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medfed.core.types import Params, Update
from medfed.server.cyclic import run_cyclic
from medfed.server.federation import Federation
from medfed.server.loop import Recorder, RoundCallback, run_federated
from medfed.server.split import run_split
from medfed.server.swarm import run_swarm
from medfed.transport.base import Transport

LOOPS = {"server": run_federated, "cyclic": run_cyclic, "swarm": run_swarm, "split": run_split}


def train_federation(
    federation: Federation,
    transport: Transport,
    init_params: Params,
    record: Recorder,
    on_round: RoundCallback | None = None,
    start_round: int = 1,
    on_updates: Callable[[int, Params, list[Update]], None] | None = None,
    state_dir: Path | None = None,
) -> Params:
    """Rounds ``start_round`` .. ``job.rounds`` by the job's topology; the final model.
    ``on_updates`` (the server's loop only: per-site contribution, which the job's checks
    refuse with the other topologies) sees each round's updates before they are merged.
    ``state_dir``: where a loop that carries more than the model between rounds (swarm's
    per-site models) saves it after every round, and finds it again on resume."""
    kind = federation.job.topology.kind
    if kind == "server":
        return run_federated(federation, transport, init_params, record, on_round, start_round, on_updates)
    if on_updates is not None:
        raise ValueError(f"topology.kind {kind}: no round loop but the server's shows the updates before a merge")
    if kind == "swarm":
        return run_swarm(federation, transport, init_params, record, on_round, start_round, state_dir)
    return LOOPS[kind](federation, transport, init_params, record, on_round, start_round)
