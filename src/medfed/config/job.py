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

from medfed.config.algorithms import AlgorithmConfig, FedAvgConfig, FedNovaConfig, ScaffoldConfig, mean_algorithm_names
from medfed.config.data import (
    SEGMENTATION_SOURCES,
    DataConfig,
    MedMNISTData,
    PairsData,
    ScannerConfig,
    SyntheticSegmentationData,
    VolumesData,
    synthetic_size_problem,
)
from medfed.config.limits import MAX_BATCH, MAX_EPOCHS, MAX_ROUND_TIMEOUT, MAX_ROUNDS, MAX_SITES, SiteName, unique_names
from medfed.config.reading import without_reading
from medfed.config.reconstruction import RECONSTRUCTION_ONLY, reconstruction_problem
from medfed.config.model import CLASSIFIERS, SEGMENTERS, AnyModelConfig, AnyTaskConfig, ModelConfig, hashed_model, hashed_task
from medfed.config.transforms import TransformsConfig
from medfed.config.generalization import GeneralizationConfig
from medfed.config.topology import PEER_ALGORITHMS, ServerTopology, TopologyConfig
from medfed.config.tracking import TrackingConfig
from medfed.config.ray import RayConfig
from medfed.config.contribution import ContributionConfig, contribution_problem
from medfed.config.he import he_problem
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
    choice on the losses the run recorded."""

    fraction: Real | None = Field(None, gt=0, le=1)
    count: Count | None = Field(None, ge=1, le=MAX_SITES)
    minimum: Count = Field(1, ge=1, le=MAX_SITES)
    method: Literal["uniform", "size", "loss"] = "uniform"
    candidates: Count | None = Field(None, ge=1, le=MAX_SITES)

    @model_validator(mode="after")
    def _one_of(self) -> "SamplingConfig":
        if self.fraction is not None and self.count is not None:
            raise ValueError("give either fraction or count, not both")
        if self.candidates is not None and self.method != "loss":
            raise ValueError(f"candidates: is for method: loss (the draw the highest losses are chosen from), "
                             f"but method is {self.method}")
        return self


class Job(Frozen):
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
        if self.sampling.count is not None and self.sampling.count > n:
            raise ValueError(f"sampling.count: is {self.sampling.count} but the job has only {n} training sites")
        c = self.sampling.candidates
        if c is not None and not self.sites_per_round <= c <= n:
            raise ValueError(f"sampling.candidates: is {c} but must be at least the {self.sites_per_round} site(s) "
                             f"of a round and at most the {n} training sites")
        if self.sampling.minimum > n:
            raise ValueError(f"sampling.minimum: is {self.sampling.minimum} but the job has only {n} training sites")
        return self

    def _check_task_fits(self) -> None:
        if self.task.kind == "reconstruction" or self.data.source in RECONSTRUCTION_ONLY:
            if (problem := reconstruction_problem(self)) is not None:
                raise ValueError(problem)
            return
        seg_task = self.task.kind == "segmentation"
        seg_data = self.data.source in SEGMENTATION_SOURCES
        if seg_data != seg_task:
            want = "task.kind: segmentation" if seg_data else "a classification task"
            raise ValueError(f"data.source: '{self.data.source}' data needs {want}, got task.kind '{self.task.kind}'")
        named = isinstance(self.model, ModelConfig)  # a MONAI class or a factory: its outputs are filled in
        if named and seg_task and self.model.name not in SEGMENTERS:
            raise ValueError(f"model.name: a segmentation task needs one of {list(SEGMENTERS)}, got '{self.model.name}'")
        if named and not seg_task and self.model.name not in CLASSIFIERS:
            raise ValueError(
                f"model.name: '{self.model.name}' segments; a classification task needs one of {list(CLASSIFIERS)}"
            )
        if isinstance(self.data, PairsData) and len(self.data.mask_values) != self.task.num_classes:
            raise ValueError(
                f"data.mask_values: {len(self.data.mask_values)} values {self.data.mask_values} but "
                f"task.num_classes is {self.task.num_classes}; give one grey level per class"
            )
        if isinstance(self.data, VolumesData) and self.data.segments:
            top = max(self.data.segments)
            if top >= self.task.num_classes:
                raise ValueError(
                    f"data.segments: class {top} but task.num_classes is {self.task.num_classes} "
                    f"(classes 0..{self.task.num_classes - 1}, 0 the background)"
                )
        if isinstance(self.data, SyntheticSegmentationData) and self.task.num_classes not in (2, 3):
            raise ValueError(
                "task.num_classes: synthetic segmentation has 2 classes (background, organ) or 3 "
                f"(background, organ, lesion), got {self.task.num_classes}"
            )
        dims = self.data_dims
        for i, step in enumerate(self.transforms.preprocess):
            size = getattr(step, "size", None) or getattr(step, "pixdim", None)
            if size is not None and dims is not None and len(size) != dims:
                raise ValueError(f"transforms.preprocess[{i}]: {step.name} needs {dims} sizes for {dims}D data, got {list(size)}")
        patch = self.transforms.patch
        if patch is not None and dims is not None and len(patch) != dims:
            raise ValueError(f"transforms.patch: needs {dims} sizes for {dims}D data, got {patch}")
        if patch is not None and not seg_task:
            raise ValueError("transforms.patch: patch training is for segmentation tasks")

    def _check_engine(self) -> None:
        """A MONAI Bundle's preprocessing replaces the job's; ``train.engine: bundle`` runs
        the bundle's trainer: refuse what either would ignore."""
        bundle = getattr(self.model, "bundle", None) is not None
        if bundle and self.model.bundle_transforms and self.transforms.preprocess:  # type: ignore[union-attr]
            raise ValueError("model.bundle_transforms: the bundle's preprocessing reads every example; leave "
                             "transforms.preprocess out, or set bundle_transforms: false")
        if self.train.engine != "bundle":
            return
        if not bundle:
            raise ValueError("train.engine: 'bundle' trains with a MONAI Bundle's own trainer; set model: {bundle: FOLDER}")
        a = self.algorithm
        if a.gradient_change is not None or a.outside_update is not None or a.beyond_mean is not None or a.name == "fedrep":
            raise ValueError(
                f"train.engine: the bundle's trainer runs the plain training its authors wrote, but '{a.name}' needs "
                "medfed's loop (it changes or adds to local training); use fedavg, a server optimizer, fedbn or "
                "fedper, or train.engine: medfed"
            )
        ignored = [
            (self.model.freeze, "model.freeze", "the bundle's optimizer trains every parameter it was given"),
            (self.privacy.dp_sgd is not None, "privacy.dp_sgd", "DP-SGD wraps medfed's optimizer, not the bundle's"),
            (self.transforms.augment or self.transforms.patch is not None, "transforms.augment",
             "the bundle's random transforms augment (and crop) in its trainer"),
            (self.generalization is not None, "generalization", "the bundle's trainer reads its own augmentation"),
            (self.task.loss not in ("cross_entropy", "dice_ce") or getattr(self.task, "class_weights", None) is not None,
             "task.loss", "the bundle's trainer uses its own loss"),
        ]
        for used, field, why in ignored:
            if used:
                raise ValueError(f"{field}: not used with train.engine: bundle ({why}); leave it out")

    def _check_generalization(self) -> None:
        """FedDG shares amplitude spectra: refuse the settings whose promise that would break."""
        g = self.generalization
        if g is None:
            return
        p = self.privacy
        for used, field, promise in ((p.secure_aggregation is not None, "privacy.secure_aggregation",
                                      "that the server sees only the sum of the updates"),
                                     (p.dp is not None or p.dp_sgd is not None, "privacy.dp",
                                      "a privacy budget that counts everything a site releases")):
            if used:
                raise ValueError(
                    f"generalization: feddg sends each site's amplitude spectra to the server and the other sites, "
                    f"outside what {field} covers, which would break its promise ({promise}); choose one"
                )
        if self.data_dims == 3:
            raise ValueError("generalization: feddg mixes 2D amplitude spectra; this job's images are 3D volumes")

    def _check_topology(self) -> None:
        """Refuse what does not fit a topology without a central aggregator, naming both
        fields and why."""
        t = self.topology
        if t.kind == "server":
            return
        how = ("passes one model from site to site" if t.kind == "cyclic"
               else f"has the sites merge models among themselves ({t.merge})")  # type: ignore[union-attr]
        where = f"topology.kind: {t.kind}"
        if self.algorithm.name not in PEER_ALGORITHMS:
            raise ValueError(
                f"algorithm.name: '{self.algorithm.name}' needs a central server's rule or state, but {where} {how}; "
                f"use one of {list(PEER_ALGORITHMS)}"
            )
        p = self.privacy
        if p.secure_aggregation is not None:
            raise ValueError(
                f"privacy.secure_aggregation: a secure sum hides each update inside the sum one party computes over "
                f"many; {where} {how}, and masked merging between sites is not built; leave it out"
            )
        if p.dp is not None:
            raise ValueError(
                f"privacy.dp: site-level DP accounts for a server's noisy mean of sampled sites' updates; {where} "
                f"{how}, which that accounting does not cover; use DP-SGD (privacy.dp_sgd), which bounds each "
                "example's influence on every model a site passes on"
            )
        if self.compression is not None:
            raise ValueError(
                f"compression: updates are encoded against the model a server sent; {where} {how}; leave it out"
            )
        if self.robust is not None and not (t.kind == "swarm" and t.merge in ("leader", "gossip")):  # type: ignore[union-attr]
            raise ValueError(
                f"robust: a robust rule merges several sites' models at once; {where} {how}, where no such merge "
                "happens; use topology.kind: swarm with merge: leader or gossip, or leave robust out"
            )
        n = len(self.training_sites)
        if t.kind == "swarm" and t.merge == "gossip" and t.peers >= n:  # type: ignore[union-attr]
            raise ValueError(f"topology.peers: {t.peers} peers, but a site has only {n - 1} other training site(s)")  # type: ignore[union-attr]

    def _check_site_refs(self) -> None:
        names = set(self.site_names)
        for field, refs in (("feature_shift", list(self.feature_shift)), ("held_out", self.held_out)):
            unknown = [r for r in refs if r not in names]
            if unknown:
                raise ValueError(f"{field}: unknown site(s) {unknown}; the sites are {self.site_names}")
        unique_names(self.held_out, "held_out entries")
        if len(self.held_out) >= len(self.site_names):
            raise ValueError(f"held_out: at least one site must train, but all of {self.site_names} are held out")

    def _check_update_path(self) -> None:
        """Refuse privacy, robustness and compression settings that do not fit together:
        each would otherwise weaken a guarantee without saying so."""
        a, p, k = self.algorithm, self.privacy, self.sites_per_round
        algo = a.name
        if p.dp is not None:
            if not a.uses_mean:
                raise ValueError(
                    f"algorithm.name: site-level DP bounds each site's share of the mean of the updates; "
                    f"'{algo}' {a.beyond_mean}, so its privacy cost is not accounted for. "
                    f"Use one of {mean_algorithm_names()}"
                )
            if self.sampling.method != "uniform":
                raise ValueError("sampling.method: DP accounting assumes every site is equally likely to be drawn; use uniform")
            if p.dp.noise == "central" and self.robust is not None:
                raise ValueError("robust: central DP noise and a robust rule both replace the mean; choose one")
            if self.has_batch_norm and algo != "fedbn":
                raise ValueError(
                    f"model.norm: site-level DP adds noise to every entry the sites share, batch-norm running "
                    f"variances included, which it can drive below zero; use small_cnn or unet with norm: group, "
                    f"segresnet, or algorithm fedbn (batch-norm layers stay at each site); got {self.model.label} "
                    f"with batch norm"
                )
        if p.dp_sgd is not None:
            if a.outside_update is not None:
                raise ValueError(
                    f"algorithm.name: '{algo}' {a.outside_update}, which DP-SGD does not privatize (it covers "
                    "the update only), so the model's privacy cost is not accounted for; use fedavg, a server "
                    "optimizer, fednova, fedper or fedrep"
                )
            if a.gradient_change is not None:
                raise ValueError(
                    f"algorithm.name: '{algo}' {a.gradient_change} outside the per-example gradients that "
                    "DP-SGD clips and noises, so its privacy cost is not accounted for; use fedavg, a server optimizer, "
                    "fednova, fedper or fedrep"
                )
            if self.task.kind != "classification":
                raise ValueError(
                    "task.kind: DP-SGD bounds each example's gradient, but the segmentation loss (Dice over the "
                    "batch) mixes examples; DP-SGD is for classification tasks"
                )
            if self.task.class_weights is not None or not isinstance(self.task.loss, str):
                raise ValueError(
                    "task.loss: DP-SGD needs the loss to be the plain batch mean of per-example losses; class_weights "
                    "(a weighted mean, normalised over the batch) and an imported loss are not, so leave them out"
                )
            m = self.model
            if not (isinstance(m, ModelConfig) and m.name == "small_cnn" and m.norm == "group"):
                got = f"{m.name} with {m.norm} norm" if isinstance(m, ModelConfig) else m.label
                raise ValueError(
                    f"model.norm: DP-SGD needs per-example gradients, which batch norm mixes; use small_cnn with "
                    f"norm: group (got {got})"
                )
        sa = p.secure_aggregation
        if sa is not None:
            if not a.uses_mean:
                raise ValueError(
                    f"algorithm.name: secure aggregation reveals only the sum of the updates; '{algo}' "
                    f"{a.beyond_mean}. Use one of {mean_algorithm_names()}"
                )
            if self.robust is not None:
                raise ValueError("robust: a robust rule needs each site's update, which secure aggregation hides")
            if self.compression is not None:
                raise ValueError("compression: secure aggregation sends updates in its own ring encoding; remove compression")
            if p.dp is not None and p.dp.adaptive is not None:
                raise ValueError("privacy.dp.adaptive: adaptive clipping needs each site's norm, which secure aggregation hides")
            if k < 2:
                raise ValueError(f"privacy.secure_aggregation: needs at least 2 sites per round, the job has {k}")
            t = self.secagg_threshold
            if sa.graph == "sparse":
                _check_sparse_graph(sa.neighbours, self.secagg_neighbours, t, k)
            if t > k:
                raise ValueError(f"privacy.secure_aggregation.threshold: is {t} but only {k} sites train in a round")
            if self.min_sites is not None and self.min_sites < t:
                raise ValueError(
                    f"min_sites: is {self.min_sites} but secure aggregation needs at least its threshold ({t}) "
                    "of survivors; raise min_sites or lower privacy.secure_aggregation.threshold"
                )
        r = self.robust
        if r is not None:
            if not a.uses_mean:
                raise ValueError(f"robust: replaces the weighted mean, but '{algo}' {a.beyond_mean}")
            if r.f is not None and k < 2 * r.f + 3:
                raise ValueError(f"robust.f: {r.rule} with f={r.f} needs at least {2 * r.f + 3} sites per round, the job has {k}")
            if r.select is not None and r.select > k:
                raise ValueError(f"robust.select: is {r.select} but only {k} sites train in a round")
        if self.attack is not None and self.attack.kind == "label_flip" and self.task.kind != "classification":
            raise ValueError("attack.kind: label_flip is for classification tasks")

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
        """2 or 3 spatial dimensions when the data source fixes it, else None."""
        if isinstance(self.data, (MedMNISTData, SyntheticSegmentationData)):
            return self.data.dims
        if isinstance(self.data, VolumesData):
            return 3
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
        if body["sampling"].get("candidates") is None:  # left out unset, likewise
            body["sampling"].pop("candidates", None)
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
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_sparse_graph(given: int | None, k: int | None, t: int, n: int) -> None:
    """SecAgg+'s degree and threshold against the round's ``n`` sites (ValueError naming the field)."""
    field = "privacy.secure_aggregation"
    if given is not None and given > n - 1:
        raise ValueError(f"{field}.neighbours: is {given} but a site has only {n - 1} other sites in a round")
    if given is not None and given % 2 and given != n - 1:
        raise ValueError(f"{field}.neighbours: must be even (the degree of a Harary graph) or {n - 1} (every other "
                         f"site of a round: the complete graph), got {given}")
    if k is not None and t > k + 1:
        raise ValueError(f"{field}.threshold: is {t} but a site's neighbourhood holds only {k + 1} sites (its {k} "
                         "neighbours and itself); raise neighbours or lower the threshold")
