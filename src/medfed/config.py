"""The job file: schema, loading and error messages.

A job is validated once, at load time, and frozen. An error names the field path and the
bad value, e.g. ``train.lr: must be > 0, got -1``. Relative data paths are resolved
against the job file's folder, so a job file and its data can move together; the output
folder is resolved against the current directory, where the user runs medfed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfed.core.errors import ConfigError

SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


RESERVED_SITE_NAMES = {"all"}  # "all" labels the mean over sites in metrics and reports


def _unique(names: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for n in names:
        if what == "site names" and n in RESERVED_SITE_NAMES:
            raise ValueError(f"'{n}' is reserved and cannot name a site")
        if n in seen:
            raise ValueError(f"{what} must be unique, '{n}' appears twice")
        seen.add(n)
    return names


# --------------------------------------------------------------------------- data


class ScannerConfig(_Frozen):
    """A site's acquisition signature, applied to images in [0, 1] before noise.

    ``out = intensity_scale * in**contrast + intensity_offset``, then a Gaussian blur of
    ``blur`` pixels (sigma) and additive Gaussian noise of standard deviation ``noise``.
    """

    intensity_scale: float = Field(1.0, gt=0)
    intensity_offset: float = 0.0
    contrast: float = Field(1.0, gt=0)
    noise: float = Field(0.0, ge=0)
    blur: float = Field(0.0, ge=0)


class SyntheticSite(_Frozen):
    """One synthetic hospital: its size, label prevalence and scanner."""

    name: SiteName
    n_train: int = Field(gt=0)
    n_val: int = Field(20, gt=0)
    n_test: int = Field(gt=0)
    prevalence: float = Field(0.5, gt=0, lt=1)
    scanner: ScannerConfig = ScannerConfig()


class SyntheticData(_Frozen):
    """Generated 2D images, 1 channel: an anatomical background with or without a lesion.

    ``lesion_contrast`` is the lesion's intensity above the tissue around it (images in
    [0, 1] before the scanner signature): lower is harder.
    """

    source: Literal["synthetic"]
    image_size: int = Field(32, ge=16, le=512)
    lesion_contrast: float = Field(0.3, gt=0, le=1)
    sites: list[SyntheticSite] = Field(min_length=1)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[SyntheticSite]) -> list[SyntheticSite]:
        _unique([s.name for s in v], "site names")
        return v

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class PartitionConfig(_Frozen):
    """How one data set is split into sites.

    ``iid``: uniformly at random, equal sizes. ``dirichlet``: label skew, each class is
    shared among sites in proportions drawn from Dirichlet(alpha); small alpha means strong
    skew. ``quantity``: site sizes drawn from Dirichlet(alpha), labels IID.
    The same per-site proportions are applied to the train, val and test splits, so a
    site's test set has the same population as its training set.
    """

    method: Literal["iid", "dirichlet", "quantity"]
    sites: list[SiteName] = Field(min_length=1)
    alpha: float = Field(0.5, gt=0)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[str]) -> list[str]:
        return _unique(v, "site names")


class MedMNISTData(_Frozen):
    """A MedMNIST ``.npz`` file (2D) with its official train/val/test split, split into sites."""

    source: Literal["medmnist"]
    path: Path
    partition: PartitionConfig

    @property
    def site_names(self) -> list[str]:
        return list(self.partition.sites)


DataConfig = Annotated[Union[SyntheticData, MedMNISTData], Field(discriminator="source")]


# --------------------------------------------------------------------------- model, task, training


class ModelConfig(_Frozen):
    """A network by name. ``small_cnn`` is for CPU runs; the others are MONAI networks.

    Input channels and output size come from the data and the task; ``width`` sets the
    channel count of the first layer of ``small_cnn``.
    """

    name: Literal["small_cnn", "densenet121", "resnet18", "resnet50"]
    width: int = Field(16, ge=1, le=512)


class TaskConfig(_Frozen):
    """Classification. ``binary`` uses one logit; ``multiclass`` one logit per class with
    softmax; ``multilabel`` one independent logit per label. ``num_classes`` is the number
    of classes (2 for binary) or of labels. ``monitor`` picks the best model on val."""

    kind: Literal["classification"] = "classification"
    labels: Literal["binary", "multiclass", "multilabel"]
    num_classes: int = Field(2, ge=2, le=1000)
    monitor: Literal["auc", "accuracy"] = "auc"

    @model_validator(mode="after")
    def _binary_has_two(self) -> "TaskConfig":
        if self.labels == "binary" and self.num_classes != 2:
            raise ValueError(f"num_classes must be 2 for binary labels, got {self.num_classes}")
        return self


class TrainConfig(_Frozen):
    """The local training step, the same at every site and for the baselines."""

    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class FedAvgConfig(_Frozen):
    """FedAvg (McMahan et al., 2017): the average of site parameters weighted by the number
    of training examples."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(_Frozen):
    """FedProx (Li et al., 2020): FedAvg plus a proximal term ``mu/2 ||w - w_global||^2``
    in each site's local loss. ``mu = 0`` is FedAvg."""

    name: Literal["fedprox"]
    mu: float = Field(0.01, ge=0)


class FedOptConfig(_Frozen):
    """Server optimizers on the pseudo-gradient (Reddi et al., 2021; Hsu et al., 2019).

    The pseudo-gradient is the example-weighted mean of the site parameters minus the
    global parameters. ``fedavgm``: heavy-ball momentum ``beta1`` (``beta1 = 0`` and
    ``server_lr = 1`` is FedAvg). ``fedadagrad``, ``fedadam``, ``fedyogi``: adaptive
    steps with first-moment decay ``beta1``, second-moment decay ``beta2`` and
    adaptivity ``tau``. Only trainable parameters take the optimizer step; buffers such
    as batch-norm statistics take the plain weighted mean.
    """

    name: Literal["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
    server_lr: float = Field(1.0, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class ScaffoldConfig(_Frozen):
    """SCAFFOLD (Karimireddy et al., 2020), control variates of option II: site gradients
    are corrected by ``c - c_i``; ``server_lr`` scales the averaged model update. Needs
    plain SGD local steps (``train.momentum: 0``): option II estimates the mean gradient as
    ``(x - y) / (K * lr)``, which momentum inflates."""

    name: Literal["scaffold"]
    server_lr: float = Field(1.0, gt=0)


class FedBNConfig(_Frozen):
    """FedBN (Li et al., ICLR 2021): batch-norm layers (weights, biases and running
    statistics) stay at each site, are never sent and never overwritten; the other layers
    are averaged as in FedAvg. Each site evaluates with its own batch-norm layers."""

    name: Literal["fedbn"]


class FedNovaConfig(_Frozen):
    """FedNova (Wang et al., 2020): each site's change is divided by its number of local
    steps (corrected for momentum) before averaging, so sites that take more steps do not
    pull the global model further. With equal steps everywhere it is FedAvg."""

    name: Literal["fednova"]


class FedDynConfig(_Frozen):
    """FedDyn (Acar et al., 2021): dynamic regularization. Each site adds
    ``-<g_i, w> + alpha/2 ||w - w_global||^2`` to its loss and updates its ``g_i``; the
    server keeps a correction ``h``. ``alpha`` > 0."""

    name: Literal["feddyn"]
    alpha: float = Field(0.01, gt=0)


class DittoConfig(_Frozen):
    """Ditto (Li et al., ICML 2021): FedAvg for the global model plus a personal model at
    each site, trained with a proximal pull of weight ``lam`` towards the global model and
    reported as the ``personalized`` arm."""

    name: Literal["ditto"]
    lam: float = Field(0.1, ge=0)


class FedRepConfig(_Frozen):
    """FedRep (Collins et al., 2021): ``personal_layers`` stay at each site like FedPer;
    each round trains the head alone for ``head_epochs`` epochs, then the body alone for
    ``train.local_epochs`` epochs."""

    name: Literal["fedrep"]
    personal_layers: list[str] = Field(min_length=1)
    head_epochs: int = Field(1, ge=1)


class MoonConfig(_Frozen):
    """MOON (Li, He and Song, 2021): a model-contrastive term of weight ``mu`` and
    temperature ``tau`` on the representation entering the classifier head."""

    name: Literal["moon"]
    mu: float = Field(1.0, ge=0)
    tau: float = Field(0.5, gt=0)


class FedPerConfig(_Frozen):
    """FedPer (Arivazhagan et al., 2019): the layers in ``personal_layers`` (module names
    of the model, e.g. ``head`` for small_cnn, ``fc`` for the MONAI ResNets,
    ``class_layers`` for DenseNet121) stay personal at each site; the rest is averaged."""

    name: Literal["fedper"]
    personal_layers: list[str] = Field(min_length=1)


# One entry per algorithm; each is `name: Literal[...]` plus its hyperparameters.
AlgorithmConfig = Annotated[
    Union[
        FedAvgConfig, FedProxConfig, FedOptConfig, ScaffoldConfig, FedBNConfig, FedNovaConfig, FedDynConfig,
        FedPerConfig, FedRepConfig, DittoConfig, MoonConfig,
    ],
    Field(discriminator="name"),
]


class SamplingConfig(_Frozen):
    """Which sites train in a round. Give ``fraction`` of the sites (rounded up) or a
    ``count``, never both; at least ``minimum`` are drawn. ``uniform`` draws every site
    with equal chance; ``size`` with chance proportional to its training examples. The
    draw is repeatable: it depends only on the job seed and the round."""

    fraction: float | None = Field(None, gt=0, le=1)
    count: int | None = Field(None, ge=1)
    minimum: int = Field(1, ge=1)
    method: Literal["uniform", "size"] = "uniform"

    @model_validator(mode="after")
    def _one_of(self) -> "SamplingConfig":
        if self.fraction is not None and self.count is not None:
            raise ValueError("give either fraction or count, not both")
        return self


# --------------------------------------------------------------------------- the job


class Job(_Frozen):
    """A whole federated run: who takes part, on what data, with which model and method.

    ``compare`` adds arms trained on the same data: ``local`` (each site alone),
    ``centralized`` (all data pooled) and ``finetuned`` (the final federated model
    fine-tuned at each site for ``finetune_epochs`` epochs on its own training data).
    """

    name: Annotated[str, Field(min_length=1, max_length=128)]
    seed: int = Field(0, ge=0, lt=2**31)
    output: Path
    rounds: int = Field(ge=1, le=100_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, le=512)
    transport: Literal["inprocess", "pool"] = "inprocess"
    workers: int | None = Field(None, ge=1, le=256)
    round_timeout: float = Field(600.0, gt=0)
    min_sites: int | None = Field(None, ge=1)
    sampling: SamplingConfig = SamplingConfig()
    eval_every: int = Field(1, ge=1)
    data: DataConfig
    model: ModelConfig
    task: TaskConfig
    algorithm: AlgorithmConfig = FedAvgConfig()
    train: TrainConfig = TrainConfig()
    compare: list[Literal["local", "centralized", "finetuned"]] = Field(default_factory=list)
    finetune_epochs: int = Field(1, ge=1)

    @field_validator("compare")
    @classmethod
    def _compare_unique(cls, v: list[str]) -> list[str]:
        return _unique(v, "compare entries")

    @model_validator(mode="after")
    def _quorum_fits(self) -> "Job":
        n = len(self.site_names)
        if self.min_sites is not None and self.min_sites > self.sites_per_round:
            raise ValueError(
                f"min_sites: is {self.min_sites} but only {self.sites_per_round} of the {n} sites train in a round"
            )
        if isinstance(self.algorithm, ScaffoldConfig) and (self.train.optimizer != "sgd" or self.train.momentum != 0):
            raise ValueError(
                "train.momentum: scaffold's control variates assume plain SGD local steps; "
                f"set train.optimizer: sgd and train.momentum: 0 (got {self.train.optimizer}, momentum {self.train.momentum:g})"
            )
        if isinstance(self.algorithm, FedNovaConfig) and self.train.optimizer != "sgd":
            raise ValueError(
                "train.optimizer: fednova normalizes by the number of SGD steps; "
                f"set train.optimizer: sgd (got {self.train.optimizer})"
            )
        if self.sampling.count is not None and self.sampling.count > n:
            raise ValueError(f"sampling.count: is {self.sampling.count} but the job has only {n} sites")
        if self.sampling.minimum > n:
            raise ValueError(f"sampling.minimum: is {self.sampling.minimum} but the job has only {n} sites")
        return self

    @property
    def sites_per_round(self) -> int:
        """How many sites are drawn each round (all of them unless sampling says otherwise)."""
        n, s = len(self.site_names), self.sampling
        k = s.count if s.count is not None else (math.ceil(s.fraction * n) if s.fraction is not None else n)
        return min(n, max(k, s.minimum))

    @property
    def site_names(self) -> list[str]:
        return self.data.site_names

    @property
    def num_threads(self) -> int:
        return self.threads if self.threads is not None else (os.cpu_count() or 1)

    @property
    def quorum(self) -> int:
        """Updates a round needs: ``min_sites``, or every site drawn for the round."""
        return self.min_sites if self.min_sites is not None else self.sites_per_round

    def job_hash(self) -> str:
        """SHA-256 of everything that affects results (the output folder does not)."""
        body = self.model_dump(mode="json", exclude={"output"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading and messages

_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "string_pattern_mismatch": "must match {pattern}",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
}


def _union_tags(union: Any, field: str) -> set[str]:
    """The discriminator values of an ``Annotated[Union[...], Field(discriminator=...)]``."""
    members = get_args(get_args(union)[0])
    return {tag for m in members for tag in get_args(m.model_fields[field].annotation)}


# The tags pydantic puts in error locations of the two unions; derived, so a new
# algorithm or data source never needs listing here.
_UNION_TAGS = _union_tags(DataConfig, "source") | _union_tags(AlgorithmConfig, "name")


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts and parts[-1] in (".data", "data", ".algorithm", "algorithm") and item in _UNION_TAGS:
            continue  # pydantic adds the union tag; users never write it
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(job)"


def _num(v: Any) -> Any:
    return f"{v:g}" if isinstance(v, float) else v


def _describe(err: dict[str, Any]) -> str:
    path = _field_path(tuple(err["loc"]))
    etype = err["type"]
    ctx = err.get("ctx", {}) or {}
    if etype == "literal_error":
        msg = f"must be one of {ctx.get('expected', '')}"
        if path.endswith("name") and path.split(".")[0] in ("model", "algorithm"):
            msg = f"unknown {path.split('.')[0]} name; {msg}"
    elif etype in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'")
        what = {"source": "data source", "name": f"{path} name"}.get(key, key)
        if etype == "union_tag_not_found":
            return f"{path}.{key}: is required"
        return f"{path}.{key}: unknown {what} {ctx.get('tag')!r}; must be one of {ctx.get('expected_tags', '')}"
    elif etype == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if not err["loc"]:  # a check across fields: its message starts with the field path
            return msg
    elif etype in _MESSAGES:
        try:
            msg = _MESSAGES[etype].format(**{k: _num(v) for k, v in ctx.items()})
        except KeyError:
            msg = err["msg"]
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
    if etype not in ("missing", "value_error", "union_tag_not_found") and "input" in err:
        got = err["input"]
        msg += f", got {got!r}" if not isinstance(got, dict) else ""
    return f"{path}: {msg}"


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [_describe(err) for err in e.errors()]
    return f"{source}: invalid job\n  " + "\n  ".join(lines)


def parse_job(raw: Any, source: str = "job", base_dir: Path | None = None) -> Job:
    """Validate a mapping (parsed YAML) as a Job. Relative data paths resolve against base_dir."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job must be a mapping of fields, got {type(raw).__name__}")
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    if base_dir is not None and isinstance(job.data, MedMNISTData) and not job.data.path.is_absolute():
        data = job.data.model_copy(update={"path": (base_dir / job.data.path).resolve()})
        job = job.model_copy(update={"data": data})
    return job


def load_job(path: str | Path) -> Job:
    """Read and validate a YAML job file. Raises ConfigError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"job file '{path}' is not valid YAML: {e}") from None
    return parse_job(raw, source=str(path), base_dir=path.parent.resolve())


def builtin_job_path(name: str = "quickstart") -> Path:
    """The path of a job file shipped inside the package (``medfed run`` with no argument)."""
    return Path(__file__).parent / "examples" / f"{name}.yaml"
