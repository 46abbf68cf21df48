"""The job's ``pretrain`` section: a federated self-supervised stage before the supervised one
(site/pretrain.py, server/pretrain.py).

The stage trains the network's encoder (the network without its last top-level layer, the
head) with a projection MLP on every training image of every site, labels unused, for
``rounds`` FedAvg rounds; the supervised federated stage then starts from the job's initial
model with the encoder's entries replaced by the pretrained ones (the head as initialized).

``method: simclr`` (Chen et al., 2020): two random views of each image, the NT-Xent loss of
their projections at ``temperature``. ``method: byol`` (Grill et al., 2020): an online
network (encoder, projector, predictor) predicts the projection of the other view made by
a target network, the exponential moving average (``ema`` decay per step) of the online
encoder and projector, kept at each site; the loss is symmetric in the two views.
``views``: the augmentation steps of one view (as in ``transforms.augment``, which they
replace during the stage; default the semi-supervised strong view, config/semi.py); ``local_epochs`` and ``lr`` default to the
job's ``train`` settings; ``projection_dim`` and ``hidden_dim`` size the projector (and the
predictor).
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Any, Literal

from pydantic import Field, model_validator

from medfed.config.limits import MAX_EPOCHS, MAX_ROUNDS
from medfed.config.transforms import AugmentStep
from medfed.core.schema import Count, Frozen, Real

DEFAULT_TEMPERATURE = 0.5
DEFAULT_EMA = 0.99


class PretrainConfig(Frozen):
    """See the module docstring."""

    method: Literal["simclr", "byol"]
    rounds: Count = Field(ge=1, le=MAX_ROUNDS)
    local_epochs: Count | None = Field(None, ge=1, le=MAX_EPOCHS)
    lr: Real | None = Field(None, gt=0)
    temperature: Real | None = Field(None, gt=0, le=100)
    ema: Real | None = Field(None, ge=0, lt=1)
    projection_dim: Count = Field(64, ge=2, le=4096)
    hidden_dim: Count = Field(128, ge=2, le=8192)
    views: list[AugmentStep] | None = None

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> "PretrainConfig":
        if self.method == "simclr" and self.ema is not None:
            raise ValueError("ema: is BYOL's target averaging decay; leave it out with method: simclr")
        if self.method == "byol" and self.temperature is not None:
            raise ValueError("temperature: is SimCLR's NT-Xent temperature; leave it out with method: byol")
        if self.views is not None and not self.views:
            raise ValueError("views: is empty, so both views would be the image itself; give augmentation steps or "
                             "leave it out")
        return self

    @property
    def tau(self) -> float:
        """SimCLR's temperature (default :data:`DEFAULT_TEMPERATURE`)."""
        return DEFAULT_TEMPERATURE if self.temperature is None else self.temperature

    @property
    def decay(self) -> float:
        """BYOL's target decay (default :data:`DEFAULT_EMA`)."""
        return DEFAULT_EMA if self.ema is None else self.ema

    def view_steps(self) -> list[Any]:
        """The steps of one view: as given, else the semi-supervised strong view."""
        from medfed.config.semi import default_views

        return list(self.views) if self.views is not None else default_views(False)[1]


def pretrain_problem(job: Any) -> str | None:
    """Why ``job``'s ``pretrain`` section cannot run, naming the field; None when it can (or
    the job has none). The stage runs FedAvg over plain updates in this process, whatever
    the job's algorithm (which trains the supervised stage)."""
    cfg: PretrainConfig | None = job.pretrain
    if cfg is None:
        return None
    kind = job.task.kind
    if kind != "classification":
        return (f"pretrain: pretrains a classifier's encoder; task.kind '{kind}' is not supported (reconstruction "
                "and segmentation have no encoder-head split medfed pretrains yet); leave pretrain out")
    if job.data_dims != 2:
        return (f"pretrain: supports 2D images only for now; the data are {job.data_dims or 'of unknown'}D; leave "
                "pretrain out")
    if job.topology.kind != "server":
        return (f"pretrain: runs with topology.kind: server only (a FedAvg stage through the server's round loop); "
                f"topology.kind is '{job.topology.kind}'; leave one of them out")
    if job.transport != "inprocess":
        return (f"pretrain: runs with transport: inprocess only for now (the stage's sites are built in the "
                f"runner's process); transport is '{job.transport}'")
    if job.train.engine != "medfed":
        return "train.engine: the bundle's trainer has no self-supervised step; use train.engine: medfed with pretrain"
    p = job.privacy
    for used, field in ((p.dp is not None, "privacy.dp"), (p.dp_sgd is not None, "privacy.dp_sgd"),
                        (p.secure_aggregation is not None, "privacy.secure_aggregation"),
                        (p.he is not None, "privacy.he")):
        if used:
            return (f"{field}: the pretraining stage's updates go through no privacy filter and no privacy ledger "
                    "counts them, so the run would release what the setting promises to protect; leave one of "
                    f"{field} and pretrain out")
    for used, field in ((job.compression is not None, "compression"), (job.robust is not None, "robust"),
                        (job.attack is not None, "attack")):
        if used:
            return (f"{field}: applies to the supervised stage's update path only, not to the pretraining stage's "
                    f"plain FedAvg; leave one of {field} and pretrain out")
    sites = getattr(job.data, "sites", None) or []
    unlabeled = [i for i, s in enumerate(sites) if getattr(s, "unlabeled", False)]
    if unlabeled and job.semi_supervised is None:
        i = unlabeled[0]
        return (f"data.sites[{i}].unlabeled: site '{sites[i].name}' has no labels: it would take part in pretraining, "
                "but the supervised stage has nothing to train it on; add a semi_supervised section (then it takes "
                "part in both stages) or leave the site out")
    return None
