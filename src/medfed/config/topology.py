"""The job's ``topology`` section: how the sites' training is combined.

``server`` (the default) is the central aggregator of every other section; ``cyclic``
passes one model from site to site (cyclical weight transfer); ``swarm`` has the sites
merge models among themselves (gossip, BrainTorrent, an elected leader); ``split`` cuts
the network in parts, the site keeping the first and last layers and the server the middle
(split learning, SplitFed; with ``u_shaped: false`` the site keeps the first layers only and
sends its labels). Which algorithms,
robust rules and privacy settings fit each is checked across sections by the job
(:meth:`medfed.config.job.Job._check_topology`).
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

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


ModuleName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.]+$")]


class SplitTopology(Frozen):
    """Split learning: the network is cut in three (medfed/cut.py). Each site keeps the
    first layers, up to and including the module ``cut`` (a name of
    ``model.named_modules()``, such as ``features.0`` of small_cnn or ``layer2`` of
    resnet18), and the last layers from module ``head`` on (default: the network's last
    top-level layer) with the loss; the server holds the layers between. So neither images
    nor labels leave a site (U-shaped split learning): batch by batch the site sends the
    activations at ``cut`` and gets the server's output at ``head`` back, then sends the
    gradient at ``head`` and gets the gradient at ``cut`` back.

    ``parallel: false`` (default): sequential split learning (Gupta and Raskar, 2018): the
    round's sites train one after the other on the server's one middle, each starting from
    the site layers the previous one passed on; the round's model is the last site's
    layers with the middle. ``parallel: true``: SplitFed v1 (Thapa et al., AAAI 2022): the
    round's sites train at once from the round's start, the server training one copy of the
    middle per site; at the end of the round the site layers and the middle copies are each
    averaged, example-weighted (FedAvg on both sides). Simulation with ``transport:
    inprocess``; in a deployment (``medfed server``) each site streams its activations and
    gradients to the server over a ``Split`` call of the mutual-TLS service
    (transport/grpc/splitting.py).

    ``u_shaped: false``: vanilla split learning (Gupta and Raskar, 2018; SplitFed's
    default), cut in two: the site keeps only the layers up to and including ``cut``, the
    server every layer after it and the loss. Batch by batch the site sends the activations
    at ``cut`` and the batch's labels (segmentation masks and reconstruction targets
    included), and gets the gradient at ``cut`` back: the labels leave the site
    (docs/privacy.md). ``head`` has no meaning then and is refused."""

    kind: Literal["split"]
    cut: ModuleName
    head: ModuleName | None = None
    parallel: bool = False
    u_shaped: bool = True

    @model_validator(mode="after")
    def _two_cuts(self) -> "SplitTopology":
        if not self.u_shaped and self.head is not None:
            raise ValueError(f"head '{self.head}' with u_shaped: false: the site keeps no last layers when the server "
                             "holds every layer after the cut and the loss; leave topology.head out, or set "
                             "topology.u_shaped: true")
        if self.head is not None and (self.head == self.cut or self.head.startswith(self.cut + ".")):
            raise ValueError(f"head '{self.head}' is inside cut '{self.cut}'; the back part with the loss must begin "
                             "after the cut")
        return self

    @property
    def label(self) -> str:
        how = ("SplitFed v1: the sites train in parallel, site layers and server copies averaged"
               if self.parallel else "sequential: the sites train one after the other on one server part")
        shape = "U-shaped" if self.u_shaped else "not U-shaped: the labels go to the server"
        return f"split learning at '{self.cut}', {shape}, {how}"


def split_problem(job: Any) -> str | None:
    """Why the :class:`~medfed.config.Job` cannot run with ``topology.kind: split`` (None:
    it can); each reason names both fields."""
    where = "topology.kind: split sends a site's activations and their gradients, batch by batch, not its model"
    a, p = job.algorithm, job.privacy
    if a.name != "fedavg":
        return (f"algorithm.name: '{a.name}' changes local training or the server's rule, but {where}, so it "
                "does not carry over; use fedavg (SplitFed averages the site layers and server copies as FedAvg does)")
    if p.dp is not None or p.dp_sgd is not None:
        field = "privacy.dp" if p.dp is not None else "privacy.dp_sgd"
        return (f"{field}: {where}; the activations and gradients that cross the cut are released at every batch "
                "and no DP accounting here covers them; leave the section out (see docs/privacy.md)")
    if p.secure_aggregation is not None:
        return (f"privacy.secure_aggregation: {where}; the server must read each batch's activations to run its "
                "layers, so there is no sum to hide them in; leave it out")
    refused = (
        (job.compression is not None, "compression", "updates are encoded against the model a server sent"),
        (job.robust is not None, "robust", "a robust rule merges whole models"),
        (job.attack is not None, "attack", "the attacks simulated act on the update a site sends"),
        (job.contribution is not None, "contribution", "contribution is computed from the round's updates"),
        (job.train.engine == "bundle", "train.engine", "a bundle's trainer runs the whole network at the site"),
        (getattr(job, "semi_supervised", None) is not None, "semi_supervised",
         "its term on unlabeled examples is computed on the whole network's outputs at the site"),
    )
    for used, field, why in refused:
        if used:
            return f"{field}: {why}, but {where}; leave it out"
    if job.transport != "inprocess":
        return (f"transport: {job.transport} runs each site in a process of its own, but the per-batch exchange of "
                "topology.kind: split runs in this process in a simulation (or over the deployment's service: medfed "
                "server); use transport: inprocess")
    return None


def topology_kind(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("kind", "server"))
    return getattr(v, "kind", "server")


TopologyConfig = Annotated[
    Union[
        Annotated[ServerTopology, Tag("server")],
        Annotated[CyclicTopology, Tag("cyclic")],
        Annotated[SwarmTopology, Tag("swarm")],
        Annotated[SplitTopology, Tag("split")],
    ],
    Discriminator(topology_kind),
]
"""The job's ``topology``: :class:`ServerTopology`, :class:`CyclicTopology`,
:class:`SwarmTopology` or :class:`SplitTopology`."""

AnyTopology = ServerTopology | CyclicTopology | SwarmTopology | SplitTopology
