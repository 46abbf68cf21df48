"""Typed payloads that flow through a round. Strings only at the edge (see core/codec.py).

``Params`` is an ordered mapping from a model's state-dict names to CPU tensors. It holds
parameters and buffers (e.g. batch-norm running statistics) alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medfed.core.text import printable

if TYPE_CHECKING:  # torch is imported lazily so that `medfed validate` stays fast
    import torch

Params = dict[str, "torch.Tensor"]

CAUSE_LIMIT = 2000  # characters of a failure's cause that are kept


class Arm(str, enum.Enum):
    """Which model a record belongs to: the federation or one of its baselines."""

    FEDERATED = "federated"
    LOCAL = "local"  # each site trains alone on its own data
    CENTRALIZED = "centralized"  # all sites' training data pooled in one place
    FINETUNED = "finetuned"  # the final federated model fine-tuned at each site on its own data
    PERSONALIZED = "personalized"  # each site's personal model kept alongside the global one (Ditto)
    ZERO_FILLED = "zero_filled"  # reconstruction: the undersampled input itself, scored as a model (no training)
    PRETRAIN = "pretrain"  # the federated self-supervised stage before the federated arm (job.pretrain)


class Metric(enum.StrEnum):
    """The figures a run records (the ``metric`` of metrics.jsonl). A str: it is written and
    compared as its name. Per-class figures add ``_class_<k>`` (:meth:`of_class`)."""

    LOSS = "loss"  # mean training loss (train) or evaluation loss (val, test)
    ACCURACY = "accuracy"
    AUC = "auc"  # ROC AUC, the mean over classes or labels where defined
    DICE = "dice"  # mean over the foreground classes
    HD95 = "hd95"  # 95th-percentile Hausdorff distance, mm (or voxels)
    PSNR = "psnr"  # reconstruction: peak signal-to-noise ratio, dB, peak 1 (images scaled to [0, 1])
    SSIM = "ssim"  # reconstruction: structural similarity, at most 1
    NMSE = "nmse"  # reconstruction: ||recon - truth||^2 / ||truth||^2
    EPSILON = "epsilon"  # privacy spent so far, at the job's delta
    MODEL_BYTES = "model_bytes"  # tensor bytes of the global model
    BYTES_SENT = "bytes_sent"  # tensor bytes a site sent, as encoded
    CLIP = "clip"  # the DP clipping bound of the round
    UNCLIPPED_FRACTION = "unclipped_fraction"  # adaptive clipping's noisy share of updates under the bound
    SELECTED = "selected"  # Krum: the updates selected
    CLIPPED_FRACTION = "clipped_fraction"  # norm bounding: the share of updates clipped
    SSL_LOSS = "ssl_loss"  # the pretraining stage's self-supervised loss (arm pretrain, split train)

    def of_class(self, k: int) -> str:
        """The name of this figure for class (or label) ``k``: ``auc_class_2``."""
        return f"{self.value}_class_{k}"


# The evaluation figures where less is better (the others, AUC, accuracy, Dice, more).
LOWER_IS_BETTER = frozenset({Metric.LOSS, Metric.HD95, Metric.NMSE})


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the figure named ``metric`` is better: ``loss``, ``hd95``,
    ``nmse`` and their per-class figures (``hd95_class_1``)."""
    return metric.partition("_class_")[0] in LOWER_IS_BETTER


class Split(str, enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class TrainSettings:
    """What a site needs to know to run its local training step.

    ``lr`` is the learning rate of the local optimizer; ``local_epochs`` full passes over
    the site's training split; ``seed`` fixes initialisation-independent randomness at the
    site for this round (shuffling, dropout, augmentation).
    """

    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str  # "sgd" | "adam"
    momentum: float
    weight_decay: float
    seed: int


class Encoding(str, enum.Enum):
    """How an update's ``params`` hold the site's model (see privacy/compression.py,
    privacy/secagg/ and privacy/he/). Every encoding but ``full`` carries the change to the
    global model the site received (the *delta*) rather than the values; compression sends
    the model's buffers (batch-norm statistics, counters) whole, secure aggregation and
    homomorphic encryption leave the integer ones out."""

    FULL = "full"  # the parameters after training, in the model's dtypes
    FP16 = "fp16"  # the delta in float16
    INT8 = "int8"  # the delta quantized to int8 with one float32 scale per tensor
    TOPK = "topk"  # the k largest delta entries of each tensor: values and flat indices
    MASKED = "masked"  # secure aggregation: the weighted delta in a finite ring, masked
    ENCRYPTED = "encrypted"  # homomorphic encryption: CKKS ciphertexts of the example-weighted delta


# What a payload must hold: tensor name -> (shape, dtype). The server checks every update
# against the spec of its round before it reads any value.
Spec = dict[str, tuple[tuple[int, ...], "torch.dtype"]]


@dataclass(frozen=True)
class SecAggPlan:
    """Secure aggregation's part of one site's round plan (privacy/secagg/): the site's
    ``weight`` in the roster's mean, in (0, 1], and the ``ciphertexts`` the other sites
    of the roster addressed to it (sender -> base64 of the sealed key shares)."""

    weight: float
    ciphertexts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundPlan:
    """The server's instructions to one site for one round."""

    job_id: str
    round: int
    arm: Arm
    train: TrainSettings
    # Algorithm-specific tensors sent along with the global parameters (e.g. a server
    # control variate). Empty for FedAvg.
    extras: Params = field(default_factory=dict)
    # Secure aggregation's part of this site's plan this round, or None without it.
    secagg: SecAggPlan | None = None


@dataclass(frozen=True)
class FitRequest:
    """Train ``params`` at ``site`` by ``plan``. ``expect`` and ``encoding``: what the
    answer must look like (names, shapes, dtypes; how it is encoded), for a transport
    that checks answers as they arrive; None: the names, shapes and dtypes of ``params``."""

    site: str
    params: Params
    plan: RoundPlan
    expect: Spec | None = None
    encoding: Encoding = Encoding.FULL


@dataclass(frozen=True)
class Update:
    """What one site sends back after local training.

    ``params`` are the site's parameters after training (full values, not deltas);
    ``num_examples`` the size of the training split used (the FedAvg weight);
    ``num_steps`` the optimizer steps taken; ``metrics`` training metrics (e.g. loss).
    ``encoding`` says how ``params`` hold them: anything but ``full`` is decoded by the
    server's incoming filters before aggregation.
    """

    site: str
    round: int
    params: Params
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: Params = field(default_factory=dict)
    encoding: Encoding = Encoding.FULL
    # the federated round the site's algorithm state was from when it trained (0: none
    # yet); None when the algorithm keeps no state at the site (site/state.py)
    state_round: int | None = None


@dataclass(frozen=True)
class EvalRequest:
    site: str
    params: Params
    splits: tuple[Split, ...]
    job_id: str
    round: int
    arm: Arm = Arm.FEDERATED


@dataclass(frozen=True)
class Message:
    """A protocol message to one site (secure aggregation's key exchange and unmasking, a
    relayed topology's models): ``topic`` names it, ``body`` is JSON-able.
    ``answer_limit``: the most bytes its answer may have (None: the transport's default,
    for small answers)."""

    site: str
    job_id: str
    round: int
    topic: str
    body: dict
    answer_limit: int | None = None


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one site's split. ``metrics`` maps name to value; a value
    is ``None`` where the metric is undefined (e.g. AUC on a split with one class)."""

    site: str
    split: Split
    num_examples: int
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class SiteFailure:
    """A site that did not answer in time or raised: the cause reaches the server log.

    A cause often holds text the site sent: it is kept printable (control characters
    escaped, at most ``CAUSE_LIMIT`` characters), so it cannot forge log lines or audit rows."""

    site: str
    cause: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "cause", printable(self.cause, CAUSE_LIMIT))
