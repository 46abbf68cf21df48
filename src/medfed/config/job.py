"""The job: the top-level fields (rounds, seed, sampling, local training, comparison arms)
and the checks across sections, such as privacy settings that do not fit the algorithm."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from medfed.config.algorithms import AlgorithmConfig, FedAvgConfig, FedNovaConfig, ScaffoldConfig
from medfed.config.data import (
    DataConfig,
    MedMNISTData,
    ScannerConfig,
    SyntheticSegmentationData,
    VolumesData,
    synthetic_size_problem,
)
from medfed.config.limits import MAX_BATCH, MAX_EPOCHS, MAX_ROUND_TIMEOUT, MAX_ROUNDS, MAX_SITES, SiteName, unique_names
from medfed.config.reading import without_reading
from medfed.config.model import AnyModelConfig, AnyTaskConfig, ModelConfig, hashed_model, hashed_task
from medfed.config.transforms import TransformsConfig
from medfed.config.generalization import GeneralizationConfig, harmofl_problem
from medfed.config.topology import ServerTopology, TopologyConfig
from medfed.config.tracking import TrackingConfig
from medfed.config.ray import RayConfig
from medfed.config.contribution import ContributionConfig, contribution_problem
from medfed.config.he import he_problem
from medfed.config.semi import SemiConfig, semi_problem
from medfed.config.pretrain import PretrainConfig, pretrain_problem
from medfed.config.unbiased import unbiased_problem
from medfed.config.job_checks import JobChecks
from medfed.core.schema import Count, Frozen, Real
from medfed.privacy.settings import CompressionConfig, PrivacyConfig
from medfed.robust.settings import AttackConfig, RobustConfig


class TrainConfig(Frozen):
    """The local training step, the same at every site and for the baselines.

    ``engine``: ``medfed`` (default) trains with medfed's loop and these settings;
    ``bundle`` (with ``model: {bundle: ...}``) with the MONAI Bundle's own trainer, through
    MONAI's federated client (``monai.fl.client.MonaiAlgo``): its optimizer, loss, inferer,
    random transforms and handlers, for ``local_epochs`` epochs a round, on the examples as
    medfed read them. Then ``batch_size``, ``lr``, ``optimizer``, ``momentum`` and
    ``weight_decay`` are the bundle's, not these."""

    local_epochs: Count = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: Count = Field(32, ge=1, le=MAX_BATCH)
    lr: Real = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Real = Field(0.9, ge=0, lt=1)
    weight_decay: Real = Field(0.0, ge=0)
    engine: Literal["medfed", "bundle"] = "medfed"


class SamplingConfig(Frozen):
    """Which sites train in a round. Give ``fraction`` of the sites (rounded up) or a
    ``count``, never both; at least ``minimum`` are drawn. ``uniform`` draws every site
    with equal chance; ``size`` with chance proportional to its training examples. The
    draw is repeatable: it depends only on the job seed and the round.

    ``loss`` (power of choice, Cho, Wang and Joshi, 2022, in its variant that uses the
    losses sites already sent): ``candidates`` sites are drawn uniformly (default twice
    the round's count, at most every training site), and the round's sites are those of
    them with the highest training loss in their last round; a site that has not trained
    yet comes first. Repeatable too: the draw depends on the job seed and the round, the
    choice on the losses the run recorded.

    ``adaptive`` (adaptive client sampling, after Active Federated Learning,
    Goetz et al., 2019; server/sampling.py): every training site is valued by its last
    training loss times the square root of its training examples; the ``exclude`` share
    of the valued sites with the lowest values sit out the valued draw, the rest are drawn
    with chances proportional to ``exp(sharpness * value)``, and the ``explore`` share of
    the round's sites is drawn uniformly from all the others. Sites that have not trained
    yet are valued first. Seeded by the job seed and the round, like the others. Unset
    fields take the defaults 0.75, 1.0 and 0.1.

    ``unbiased`` (server/unbiased.py; in the spirit of FedACS, Weng et al., 2025, medfed's
    own derivation): the round's count of slots drawn with replacement, with chances
    proportional to a site's training examples over its observed answer rate (smoothed,
    at least ``min_rate``, default 0.05); the updates are combined per local step with
    the draw's own weights, which corrects for sites that answer less often and for
    unequal local work. For algorithms whose server step is a weighted mean of models."""

    fraction: Real | None = Field(None, gt=0, le=1)
    count: Count | None = Field(None, ge=1, le=MAX_SITES)
    minimum: Count = Field(1, ge=1, le=MAX_SITES)
    method: Literal["uniform", "size", "loss", "adaptive", "unbiased"] = "uniform"
    candidates: Count | None = Field(None, ge=1, le=MAX_SITES)
    exclude: Real | None = Field(None, ge=0, lt=1)
    sharpness: Real | None = Field(None, ge=0, le=100)
    explore: Real | None = Field(None, ge=0, le=1)
    min_rate: Real | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_of(self) -> "SamplingConfig":
        if self.fraction is not None and self.count is not None:
            raise ValueError("give either fraction or count, not both")
        if self.candidates is not None and self.method != "loss":
            raise ValueError(f"candidates: is for method: loss (the draw the highest losses are chosen from), "
                             f"but method is {self.method}")
        given = [f for f in ("exclude", "sharpness", "explore") if getattr(self, f) is not None]
        if given and self.method != "adaptive":
            raise ValueError(f"{given[0]}: is for method: adaptive, but method is {self.method}")
        if self.min_rate is not None and self.method != "unbiased":
            raise ValueError(f"min_rate: is for method: unbiased (the least answer rate it assumes), "
                             f"but method is {self.method}")
        return self


class Job(JobChecks, Frozen):
    """A whole federated run: who takes part, on what data, with which model and method.

    ``compare`` adds arms trained on the same data: ``local`` (each site alone),
    ``centralized`` (all data pooled) and ``finetuned`` (the final federated model
    fine-tuned at each site for ``finetune_epochs`` epochs on its own training data).

    ``feature_shift`` puts a scanner signature on a site's images after they are read
    (heterogeneity on real data). ``held_out`` sites never train, in any arm: they are
    evaluated with the models the other sites trained (domain generalization).
    """

    name: Annotated[str, Field(min_length=1, max_length=128)]
    seed: Count = Field(0, ge=0, lt=2**31)
    output: Path
    rounds: Count = Field(ge=1, le=MAX_ROUNDS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Count | None = Field(None, ge=1, le=512)
    transport: Literal["inprocess", "pool", "ray"] = "inprocess"
    workers: Count | None = Field(None, ge=1, le=256)
    round_timeout: Real = Field(600.0, gt=0, le=MAX_ROUND_TIMEOUT)
    min_sites: Count | None = Field(None, ge=1, le=MAX_SITES)
    sampling: SamplingConfig = SamplingConfig()
    eval_every: Count = Field(1, ge=1, le=MAX_ROUNDS)
    data: DataConfig
    transforms: TransformsConfig = TransformsConfig()
    feature_shift: dict[SiteName, ScannerConfig] = Field(default_factory=dict)
    held_out: list[SiteName] = Field(default_factory=list)
    model: AnyModelConfig
    task: AnyTaskConfig
    algorithm: AlgorithmConfig = FedAvgConfig()
    topology: TopologyConfig = ServerTopology()
    generalization: GeneralizationConfig | None = None
    train: TrainConfig = TrainConfig()
    compare: list[Literal["local", "centralized", "finetuned"]] = Field(default_factory=list)
    finetune_epochs: Count = Field(1, ge=1, le=MAX_EPOCHS)
    privacy: PrivacyConfig = PrivacyConfig()
    compression: CompressionConfig | None = None
    robust: RobustConfig | None = None
    attack: AttackConfig | None = None
    contribution: ContributionConfig | None = None  # per-site Shapley values (config/contribution.py)
    ray: RayConfig | None = None  # where transport: ray runs (config/ray.py)
    # training on unlabeled examples too (config/semi.py); left out of the dumps when not given
    semi_supervised: SemiConfig | None = Field(None, exclude_if=lambda v: v is None)
    # a federated self-supervised stage before the supervised one (config/pretrain.py); left out when not given
    pretrain: PretrainConfig | None = Field(None, exclude_if=lambda v: v is None)
    # where results are also logged, not what is computed: left out of every dump (job.yaml, the
    # job hash, what sites receive); see config/tracking.py
    tracking: TrackingConfig | None = Field(None, exclude=True)

    @field_validator("compare")
    @classmethod
    def _compare_unique(cls, v: list[str]) -> list[str]:
        return unique_names(v, "compare entries")

    @model_validator(mode="after")
    def _quorum_fits(self) -> "Job":
        n = len(self.site_names) - len(self.held_out)
        if self.min_sites is not None and self.min_sites > self.sites_per_round:
            raise ValueError(
                f"min_sites: is {self.min_sites} but only {self.sites_per_round} of the {n} sites train in a round"
            )
        if isinstance(self.algorithm, ScaffoldConfig) and (self.train.optimizer != "sgd" or self.train.momentum != 0):
            raise ValueError(
                "train.momentum: scaffold's control variates assume plain SGD local steps; "
                f"set train.optimizer: sgd and train.momentum: 0 (got {self.train.optimizer}, momentum {self.train.momentum:g})"
            )
        if self.algorithm.name == "fedce" and self.sites_per_round < n:
            raise ValueError(
                f"sampling: fedce compares every site with all the others each round, but only "
                f"{self.sites_per_round} of the {n} training sites train in a round; leave sampling out"
            )
        if isinstance(self.algorithm, FedNovaConfig) and self.train.optimizer != "sgd":
            raise ValueError(
                "train.optimizer: fednova normalizes by the number of SGD steps; "
                f"set train.optimizer: sgd (got {self.train.optimizer})"
            )
        problem = synthetic_size_problem(self.data)
        if problem is not None:
            raise ValueError(problem)
        if (problem := harmofl_problem(self.algorithm.name, self.data_dims, self.task.kind,
                                       self.transforms.patch is not None, self.topology.kind,
                                       self.generalization is not None)) is not None:
            raise ValueError(problem)
        self._check_task_fits()
        self._check_engine()
        self._check_topology()
        self._check_generalization()
        self._check_site_refs()
        self._check_update_path()
        if self.ray is not None and self.transport != "ray":
            raise ValueError(f"ray: settings of transport: ray, but the job's transport is '{self.transport}'; "
                             "set transport: ray or remove the ray section")
        if (problem := contribution_problem(self)) is not None:
            raise ValueError(problem)
        if (problem := he_problem(self)) is not None:
            raise ValueError(problem)
        if (problem := pretrain_problem(self)) is not None:
            raise ValueError(problem)
        if (problem := semi_problem(self)) is not None:
            raise ValueError(problem)
        if (problem := unbiased_problem(self)) is not None:
            raise ValueError(problem)
        if self.sampling.count is not None and self.sampling.count > n:
            raise ValueError(f"sampling.count: is {self.sampling.count} but the job has only {n} training sites")
        c = self.sampling.candidates
        if c is not None and not self.sites_per_round <= c <= n:
            raise ValueError(f"sampling.candidates: is {c} but must be at least the {self.sites_per_round} site(s) "
                             f"of a round and at most the {n} training sites")
        if self.sampling.minimum > n:
            raise ValueError(f"sampling.minimum: is {self.sampling.minimum} but the job has only {n} training sites")
        return self

    @property
    def has_batch_norm(self) -> bool:
        """True when the job's network, one of medfed's by name, has batch-norm layers. False
        for a MONAI class or a factory, which are known only once built: the run checks
        those when it builds its first model (server/runner.py ``initial_model``)."""
        m = self.model
        if not isinstance(m, ModelConfig):
            return False
        return m.name in ("densenet121", "resnet18", "resnet50") or (m.name in ("small_cnn", "unet") and m.norm == "batch")

    @property
    def secagg_threshold(self) -> int:
        """Secure aggregation's threshold: as set, or a majority of the round's sites (with
        ``graph: sparse``, of a site's closed neighbourhood, :attr:`secagg_neighbours` + 1)."""
        sa = self.privacy.secure_aggregation
        if sa is not None and sa.threshold is not None:
            return sa.threshold
        if sa is not None and sa.graph == "sparse":
            from medfed.privacy.secagg.graph import neighbourhood_threshold

            return neighbourhood_threshold(self.secagg_neighbours)  # type: ignore[arg-type]
        return self.sites_per_round // 2 + 1

    @property
    def secagg_neighbours(self) -> int | None:
        """SecAgg+'s degree k (``graph: sparse``): as set, or chosen from the round's sites
        and ``dropout`` (privacy/secagg/graph.py ``choose_neighbours``); None otherwise."""
        sa = self.privacy.secure_aggregation
        if sa is None or sa.graph != "sparse":
            return None
        from medfed.privacy.secagg.graph import DEFAULT_DROPOUT, choose_neighbours

        n = self.sites_per_round
        if sa.neighbours is not None:
            return sa.neighbours
        return choose_neighbours(n, DEFAULT_DROPOUT if sa.dropout is None else sa.dropout, sa.threshold)

    @property
    def data_dims(self) -> int | None:
        """2 or 3 spatial dimensions of the job's examples when the data source fixes it,
        else None. A reconstruction job cuts volumes into 2D slices (data/slices.py)."""
        if isinstance(self.data, (MedMNISTData, SyntheticSegmentationData)):
            return self.data.dims
        if isinstance(self.data, VolumesData):
            return 2 if self.task.kind == "reconstruction" else 3
        return 2

    @property
    def training_sites(self) -> list[str]:
        """The sites that train: all but the held-out ones, in the job's order."""
        return [s for s in self.site_names if s not in self.held_out]

    @property
    def sites_per_round(self) -> int:
        """How many sites are drawn each round (all training sites unless sampling says
        otherwise)."""
        n, s = len(self.training_sites), self.sampling
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
        """SHA-256 of everything that affects results (the output folder and how the data
        is read, :data:`~medfed.config.data.READING_FIELDS`, do not). The init weights count
        by their content (``model.init_sha256``), not their path (see
        :func:`~medfed.config.model.hashed_model`)."""
        body = self.model_dump(mode="json", exclude={"output"})
        body["data"] = without_reading(body["data"])
        m = self.model
        if m.init is not None and m.init_sha256 is None and m.init.name != "<site-local>":
            # built without parse_job (which fills it in): hash the file now
            from medfed.core.files import sha256_file

            body["model"]["init_sha256"] = sha256_file(m.init)
        bundle = getattr(m, "bundle", None)
        if bundle is not None and m.bundle_sha256 is None and bundle.name != "<site-local>":  # type: ignore[union-attr]
            from medfed.core.files import bundle_sha256

            body["model"]["bundle_sha256"] = bundle_sha256(bundle)
        if body.get("topology") == {"kind": "server"}:  # left out at its default, likewise
            body.pop("topology")
        if body.get("ray") is None:  # left out when not given: older jobs keep their hash
            body.pop("ray", None)
        if body.get("contribution") is None:  # left out when not asked for: older jobs keep their hash
            body.pop("contribution", None)
        if body.get("generalization", 0) is None:  # left out unset, likewise
            body.pop("generalization")
        for field in ("candidates", "exclude", "sharpness", "explore", "min_rate"):  # left out unset, likewise
            if body["sampling"].get(field) is None:
                body["sampling"].pop(field, None)
        sa = (body.get("privacy") or {}).get("secure_aggregation")
        if sa is not None and sa.get("graph") == "complete":  # SecAgg+'s fields left out at their defaults, likewise
            for field in ("graph", "neighbours", "dropout"):
                sa.pop(field, None)
        if (body.get("privacy") or {}).get("he", 0) is None:  # privacy.he left out unset: older jobs keep their hash
            body["privacy"].pop("he")
        if body["train"].get("engine") == "medfed":  # left out at its default: older jobs keep their hash
            body["train"].pop("engine")
        body["model"] = hashed_model(body["model"])
        body["task"] = hashed_task(body["task"])
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def job_id(self) -> str:
        """The short id every plan, request and site message carries: the job hash's first
        16 hex digits."""
        return self.job_hash()[:16]

    def to_yaml(self) -> str:
        # libyaml's dumper when PyYAML has it: the same text, several times faster
        return yaml.dump(self.model_dump(mode="json"), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                         sort_keys=False)
