"""The job's ``algorithm`` section: one settings class per federated algorithm, each with
what the algorithm does beyond plain FedAvg declared once, on its own class.

The server and site halves of each algorithm live in :mod:`medfed.algorithms`; the
declarations here are what the job's checks need before any of it is built.
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Annotated, ClassVar, Literal, Union, get_args

from pydantic import Field

from medfed.config.limits import MAX_EPOCHS
from medfed.core.schema import Count, Frozen, Real


class AlgorithmSettings(Frozen):
    """The base of every algorithm's settings. Besides its fields (``name`` and its
    hyperparameters), each algorithm declares as class attributes, never job fields:

    ``beyond_mean``: None when the server rule uses the updates only through their
    example-weighted mean, so that a robust rule, site-level DP or secure aggregation can
    take that mean's place; else what the rule does beyond the mean ("also sends control
    variates"), as the refusals of those settings say it.

    ``gradient_change``: None when local training follows the gradients of the task loss
    alone; else how the algorithm changes them ("adds a proximal loss term"), which DP-SGD,
    clipping and noising only the per-example gradients of the task loss, cannot bound.

    ``outside_update``: None when the server rule uses nothing a site computes from its
    data besides its update; else what it uses ("weights each update by the site's
    training loss"), which DP-SGD, privatizing only the update, does not cover.
    """

    beyond_mean: ClassVar[str | None] = None
    gradient_change: ClassVar[str | None] = None
    outside_update: ClassVar[str | None] = None

    @property
    def uses_mean(self) -> bool:
        """True when the server rule uses the updates only through their weighted mean."""
        return self.beyond_mean is None


class FedAvgConfig(AlgorithmSettings):
    """FedAvg (McMahan et al., 2017): the average of site parameters weighted by the number
    of training examples."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(AlgorithmSettings):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term ``mu/2 ||w - w_global||^2``
    in each site's local loss. ``mu = 0`` is FedAvg."""

    name: Literal["fedprox"]
    gradient_change: ClassVar[str | None] = "adds a proximal loss term"
    mu: Real = Field(0.01, ge=0)


class FedOptConfig(AlgorithmSettings):
    """Server optimizers on the pseudo-gradient (Reddi et al., 2021; Hsu et al., 2019).

    The pseudo-gradient is the example-weighted mean of the site parameters minus the
    global parameters. ``fedavgm``: heavy-ball momentum ``beta1`` (``beta1 = 0`` and
    ``server_lr = 1`` is FedAvg). ``fedadagrad``, ``fedadam``, ``fedyogi``: adaptive
    steps with first-moment decay ``beta1``, second-moment decay ``beta2`` and
    adaptivity ``tau``. Only trainable parameters take the optimizer step; buffers such
    as batch-norm statistics take the plain weighted mean.
    """

    name: Literal["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
    server_lr: Real = Field(1.0, gt=0)
    beta1: Real = Field(0.9, ge=0, lt=1)
    beta2: Real = Field(0.99, ge=0, lt=1)
    tau: Real = Field(1e-3, gt=0)


class ScaffoldConfig(AlgorithmSettings):
    """SCAFFOLD (Karimireddy et al., 2020), control variates of option II: site gradients
    are corrected by ``c - c_i``; ``server_lr`` scales the averaged model update. Needs
    plain SGD local steps (``train.momentum: 0``): option II estimates the mean gradient as
    ``(x - y) / (K * lr)``, which momentum inflates."""

    name: Literal["scaffold"]
    beyond_mean: ClassVar[str | None] = "also sends control variates"
    gradient_change: ClassVar[str | None] = "corrects the gradients with control variates"
    server_lr: Real = Field(1.0, gt=0)


class FedBNConfig(AlgorithmSettings):
    """FedBN (Li et al., ICLR 2021): batch-norm layers (weights, biases and running
    statistics) stay at each site, are never sent and never overwritten; the other layers
    are averaged as in FedAvg. Each site evaluates with its own batch-norm layers."""

    name: Literal["fedbn"]


class FedNovaConfig(AlgorithmSettings):
    """FedNova (Wang et al., 2020): each site's change is divided by its number of local
    steps (corrected for momentum) before averaging, so sites that take more steps do not
    pull the global model further. With equal steps everywhere it is FedAvg."""

    name: Literal["fednova"]
    beyond_mean: ClassVar[str | None] = "rescales each site's update by its own step count"


class FedDynConfig(AlgorithmSettings):
    """FedDyn (Acar et al., 2021): dynamic regularization. Each site adds
    ``-<g_i, w> + alpha/2 ||w - w_global||^2`` to its loss and updates its ``g_i``; the
    server keeps a correction ``h``. ``alpha`` > 0."""

    name: Literal["feddyn"]
    beyond_mean: ClassVar[str | None] = "keeps a server correction built from each update"
    gradient_change: ClassVar[str | None] = "adds a dynamic regularizer"
    alpha: Real = Field(0.01, gt=0)


class DittoConfig(AlgorithmSettings):
    """Ditto (Li et al., ICML 2021): FedAvg for the global model plus a personal model at
    each site, trained with a proximal pull of weight ``lam`` towards the global model and
    reported as the ``personalized`` arm."""

    name: Literal["ditto"]
    gradient_change: ClassVar[str | None] = "trains a personal model with a proximal term"
    lam: Real = Field(0.1, ge=0)


class FedRepConfig(AlgorithmSettings):
    """FedRep (Collins et al., 2021): ``personal_layers`` stay at each site like FedPer;
    each round trains the head alone for ``head_epochs`` epochs, then the body alone for
    ``train.local_epochs`` epochs."""

    name: Literal["fedrep"]
    personal_layers: list[str] = Field(min_length=1)
    head_epochs: Count = Field(1, ge=1, le=MAX_EPOCHS)


class MoonConfig(AlgorithmSettings):
    """MOON (Li, He and Song, 2021): a model-contrastive term of weight ``mu`` and
    temperature ``tau`` on the representation entering the classifier head."""

    name: Literal["moon"]
    gradient_change: ClassVar[str | None] = "adds a contrastive loss term"
    mu: Real = Field(1.0, ge=0)
    tau: Real = Field(0.5, gt=0)


class FedPerConfig(AlgorithmSettings):
    """FedPer (Arivazhagan et al., 2019): the layers in ``personal_layers`` (module names
    of the model, e.g. ``head`` for small_cnn, ``fc`` for the MONAI ResNets,
    ``class_layers`` for DenseNet121) stay personal at each site; the rest is averaged."""

    name: Literal["fedper"]
    personal_layers: list[str] = Field(min_length=1)


class QFedAvgConfig(AlgorithmSettings):
    """q-FedAvg (Li, Sanjabi, Beirami and Smith, ICLR 2020), the solver of q-FFL: each site
    also sends the loss of the global model on its training data, and the server weights
    each site's change by that loss to the power ``q``, so the sites the model serves worst
    pull it hardest. ``q = 0`` is the unweighted mean of the sites' models; larger ``q`` is
    fairer (less spread across sites) at some cost to the mean. ``lipschitz``: the
    constant ``L`` of the step (default ``1 / train.lr``)."""

    name: Literal["qfedavg"]
    beyond_mean: ClassVar[str | None] = "weights each site's update by its own training loss"
    outside_update: ClassVar[str | None] = "weights each update by the site's training loss"
    q: Real = Field(1.0, ge=0)
    lipschitz: Real | None = Field(None, gt=0)


class FedCEConfig(AlgorithmSettings):
    """FedCE (Jiang et al., CVPR 2023, "Fair Federated Medical Image Segmentation via
    Client Contribution Estimation"): the server weights each site's update by an estimate
    of its contribution, in gradient space (how far the site's change points from the
    others' combined change: one minus their cosine, averaged over the rounds) and in data
    space (how badly the others' model does on the site's validation data: one minus the
    monitored metric of the global model without the site's last contribution, averaged
    over the rounds, measured by the site). ``mode``: the two estimates multiplied
    (``times``, the default) or added (``plus``). Every training site takes part in every
    round (the estimates compare each site with all the others)."""

    name: Literal["fedce"]
    beyond_mean: ClassVar[str | None] = "weights each site's update by its estimated contribution"
    outside_update: ClassVar[str | None] = (
        "weights each update by how the others' model does on the site's validation data"
    )
    mode: Literal["times", "plus"] = "times"


class HarmoFLConfig(AlgorithmSettings):
    """HarmoFL (Jiang, Wang and Dou, AAAI 2022; algorithms/harmofl.py): at each site,
    every image's amplitude spectrum (in the central band of ``ratio`` of each side; 1, the
    default, is the whole spectrum) is replaced by the site's own average amplitude over
    ``amplitude_images`` of its training images, its phase kept (nothing of it leaves the
    site); and each local step takes its gradient at the weights moved by ``alpha``
    (the perturbation's radius, in the units of the weights) along the normalized gradient.
    The server averages as FedAvg. 2D images, the server topology."""

    name: Literal["harmofl"]
    gradient_change: ClassVar[str | None] = "takes each gradient at weights perturbed along the batch's gradient"
    alpha: Real = Field(0.05, ge=0, le=10)
    ratio: Real = Field(1.0, gt=0, le=1)
    amplitude_images: Count = Field(256, ge=1, le=100_000)


# One entry per algorithm; each is `name: Literal[...]` plus its hyperparameters, and declares
# what it does beyond the mean as class attributes (see AlgorithmSettings).
AlgorithmConfig = Annotated[
    Union[
        FedAvgConfig, FedProxConfig, FedOptConfig, ScaffoldConfig, FedBNConfig, FedNovaConfig, FedDynConfig,
        FedPerConfig, FedRepConfig, DittoConfig, MoonConfig, QFedAvgConfig, FedCEConfig, HarmoFLConfig,
    ],
    Field(discriminator="name"),
]


def algorithm_names(settings: type[AlgorithmSettings]) -> tuple[str, ...]:
    """The values of ``algorithm.name`` that pick ``settings`` (FedOptConfig has four)."""
    return get_args(settings.model_fields["name"].annotation)


def mean_algorithm_names() -> list[str]:
    """The names of the algorithms whose server rule uses only the weighted mean, sorted."""
    members: tuple[type[AlgorithmSettings], ...] = get_args(get_args(AlgorithmConfig)[0])
    return sorted(n for m in members if m.beyond_mean is None for n in algorithm_names(m))
