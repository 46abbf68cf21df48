"""The job's checks across sections (each raises ValueError naming the field): the task
against the data and the model, the training engine, FedDG, the topologies, site names,
and the update path (privacy, compression, robust rules, attacks) against the algorithm.
:class:`JobChecks` is a base of :class:`~medfed.config.job.Job`, which runs them when it is
validated."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from medfed.config.algorithms import mean_algorithm_names
from medfed.config.data import (
    SEGMENTATION_SOURCES,
    PairsData,
    SyntheticSegmentationData,
    VolumesData,
)
from medfed.config.limits import unique_names
from medfed.config.reconstruction import KSPACE_MODELS, RECONSTRUCTION_ONLY, reconstruction_problem
from medfed.config.model import CLASSIFIERS, SEGMENTERS, ModelConfig
from medfed.config.topology import PEER_ALGORITHMS, split_problem


class JobChecks:
    """The cross-section checks of a job (mixed into :class:`~medfed.config.job.Job`)."""

    def _check_task_fits(self) -> None:
        if self.task.kind == "reconstruction" or self.data.source in RECONSTRUCTION_ONLY:
            if (problem := reconstruction_problem(self)) is not None:
                raise ValueError(problem)
            return
        if getattr(self.model, "name", None) in KSPACE_MODELS:
            raise ValueError(f"model.name: '{self.model.name}' reconstructs MRI from undersampled k-space; it needs "
                             f"task.kind: reconstruction, got task.kind '{self.task.kind}'")
        for i, site in enumerate((getattr(self.data, "sites", None) or [])):
            if getattr(site, "acceleration", None) is not None:
                raise ValueError(f"data.sites[{i}].acceleration: undersampling is for task.kind: reconstruction, got "
                                 f"task.kind '{self.task.kind}'; leave it out")
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
        if t.kind == "split":
            if (problem := split_problem(self)) is not None:
                raise ValueError(problem)
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
