"""The job's ``topology`` section: how the sites' training is combined.

``server`` (the default) is the central aggregator of every other section; ``cyclic``
passes one model from site to site (cyclical weight transfer); ``swarm`` has the sites
merge models among themselves (gossip, BrainTorrent, an elected leader). Which algorithms,
robust rules and privacy settings fit each is checked across sections by the job
(:meth:`medfed.config.job.Job._check_topology`).
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from medfed.config.limits import MAX_SITES
from medfed.core.schema import Count, Frozen

# the site halves that only change how a site trains (a proximal term, local batch-norm
# layers): they keep their meaning when the model travels between sites instead of
# through a server
PEER_ALGORITHMS = ("fedavg", "fedprox", "fedbn")


class ServerTopology(Frozen):
    """A central server merges the sites' updates each round (every algorithm)."""

    kind: Literal["server"] = "server"

    @property
    def label(self) -> str:
        return "a central server"


class CyclicTopology(Frozen):
    """Cyclical weight transfer: each round the model visits the round's training sites
    one after the other, each training ``train.local_epochs`` on its own data from the
    model the previous site passed on; the round's model is what the last site produced.
    ``order``: ``fixed`` (the job's site order) or ``shuffled`` (a new seeded order each
    round). A site that fails or times out is skipped with a log line: the model goes on
    from the last site that succeeded."""

    kind: Literal["cyclic"]
    order: Literal["fixed", "shuffled"] = "fixed"

    @property
    def label(self) -> str:
        return f"cyclical weight transfer ({self.order} order)"


class SwarmTopology(Frozen):
    """Swarm learning: every site of the round trains, then the sites merge models among
    themselves, ``merge``:

    - ``leader``: a leader elected each round (``leader: random``, a seeded draw among the
      round's sites, or ``round_robin``) merges every site's model (the algorithm's rule:
      the example-weighted mean, or the job's robust rule); every site starts the next
      round from the merge. With every site merging it is FedAvg.
    - ``gossip``: each site keeps its own model and averages it with those of ``peers``
      sites drawn for it each round (seeded), example-weighted (or by the robust rule).
    - ``braintorrent``: each round one site, drawn at random (seeded), merges its own model
      with those of the peers that trained since it last merged (example-weighted); the
      others keep what they trained.

    With ``gossip`` and ``braintorrent`` each site's own model is evaluated on its own data
    (arm ``personalized``), the consensus (the example-weighted mean of the sites' models)
    at every site (arm ``federated``), and the spread between the models, their mean L2
    distance to the consensus, is recorded as ``consensus_distance``."""

    kind: Literal["swarm"]
    merge: Literal["leader", "gossip", "braintorrent"] = "leader"
    peers: Count = Field(2, ge=1, le=MAX_SITES)
    leader: Literal["random", "round_robin"] = "random"

    @property
    def label(self) -> str:
        how = {"leader": f"a leader elected each round ({self.leader.replace('_', ' ')}) merges",
               "gossip": f"each site merges with {self.peers} peer(s) drawn each round",
               "braintorrent": "one site a round merges with the peers that trained since its last merge"}
        return f"swarm learning, {self.merge}: {how[self.merge]}"


def topology_kind(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("kind", "server"))
    return getattr(v, "kind", "server")


TopologyConfig = Annotated[
    Union[
        Annotated[ServerTopology, Tag("server")],
        Annotated[CyclicTopology, Tag("cyclic")],
        Annotated[SwarmTopology, Tag("swarm")],
    ],
    Discriminator(topology_kind),
]
"""The job's ``topology``: :class:`ServerTopology`, :class:`CyclicTopology` or
:class:`SwarmTopology`."""

AnyTopology = ServerTopology | CyclicTopology | SwarmTopology
