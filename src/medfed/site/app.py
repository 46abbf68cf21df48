"""A site's answers to the server: ``fit`` (local training) and ``evaluate``.

The same class serves every transport: in-process it is called directly, in a worker
process it is called by the pool worker, in a deployment by the network client.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from medfed.algorithms import build_algorithm
from medfed.algorithms.base import Phase, SiteHook, buffer_keys
from medfed.config import HarmoFLConfig, Job
from medfed.core.errors import SiteError
from medfed.core.types import Arm, EvalResult, Metric, Params, RoundPlan, Split, Update
from medfed.data.base import SiteData
from medfed.data.frequency import AMPLITUDES_TOPIC, FEDDG_TOPICS
from medfed.data.kspace_input import ZeroFilledImage
from medfed.models import ModelFactory, build_model, build_user_model, get_params
from medfed.privacy.base import ProtocolParty, UpdateFilter
from medfed.site.evaluate import evaluate_split
from medfed.privacy.dpsgd import SampleDP
from medfed.site.train import TrainStats, train_local
from medfed.site.state import RoundStates, SiteState, StateFile
from medfed.site.semi import make_semi_hook, with_semi
from medfed.site.update_path import poisoned_data, sample_dp_for, site_filters
from medfed.tasks import build_task
from medfed.weights import frozen_parameters

if TYPE_CHECKING:
    import tenseal as ts

    from medfed.privacy.secagg.signing import Credentials


class PeerPart(Protocol):
    """A site's part in a relayed cyclic or swarm topology (site/peers.py :class:`PeerRole`)."""

    def answer(self, topic: str, rnd: int, body: dict) -> dict: ...


class SiteApp:
    """One site: its data, a model buffer and the algorithm's site hook.

    ``data.name`` is the site name. The model object is built once and reused; each
    request loads the parameters it carries, so the site keeps no hidden model state
    between rounds other than what the algorithm keeps on purpose: its hook's state and,
    for the federated arm, the entries named by ``algorithm.local_keys`` (FedBN's
    batch-norm layers), which are never sent and replace the server's on every load.
    """

    def __init__(
        self, data: SiteData, job: Job, device: torch.device, model: nn.Module | None = None, secure: bool = False,
        credentials: Credentials | None = None, num_sites: int | None = None, he_context: ts.Context | None = None,
    ):
        self.name = data.name
        self.data = poisoned_data(job, data)  # unchanged unless the job simulates a label-flipping attack here
        self.device = device
        self.task = build_task(job)
        self.monitor = job.task.monitor  # the metric a hook's probe model is scored by
        self.generalization = job.generalization  # FedDG: amplitudes shared before round 1
        self.mixed = None  # FedDG: the augmentation with the consortium's amplitudes (federated training only)
        # HarmoFL: the federated model's data, amplitude-normalized at this site (built when first used)
        self.harmofl = job.algorithm if isinstance(job.algorithm, HarmoFLConfig) else None
        self._harmonized: SiteData | None = None
        self.seed = job.seed
        self.augment = build_site_augment(job, data.train.spatial_dims)
        # ``model`` is a work buffer: every request loads its parameters first, so sites
        # that run one after another in one process can share one (less memory, warmer caches)
        self.model = model if model is not None else model_for(job, data)
        self.model.to(device)
        # the job's frozen parameters (model.freeze): trained by no phase of any arm
        self.frozen = frozen_parameters(self.model, job.model.freeze)
        # ``num_sites``: the job's training sites, counted once by whoever builds many apps
        n = num_sites if num_sites is not None else len(job.training_sites)
        algorithm = build_algorithm(job.algorithm, self.model, n, job.train.momentum)
        # the algorithm's hook, joined with the job's semi-supervised one (site/semi.py); the
        # baselines train with the semi-supervised hook alone, or plainly without one
        self._hooks = {Arm.FEDERATED: with_semi(algorithm.make_site_hook(), job)}
        for arm in (Arm.LOCAL, Arm.CENTRALIZED, Arm.FINETUNED):
            if (semi := make_semi_hook(job)) is not None:
                self._hooks[arm] = semi
        self._local_keys = algorithm.local_keys
        self._kept: Params = {}  # this site's values of the local keys, after its first fit
        # the update path of federated rounds (a deployment: secure noise, and the kit's
        # credentials for secure aggregation)
        self.filters = site_filters(job, self.name, secure, buffer_keys(self.model), credentials, he_context)
        self.private = sample_dp_for(job, secure)
        # the algorithm's state at this site across federated rounds (site/state.py): kept
        # one round back, so that a round the server redoes after a crash starts as before
        self.states = RoundStates(self.name, self._snapshot, self._restore) if self._stateful() else None
        self.engine = None  # train.engine: bundle: the bundle's own trainer, built on the first round
        self.peers: PeerPart | None = None  # a relayed cyclic or swarm topology: the models this site holds
        if job.train.engine == "bundle":
            from medfed.bundles import BundleTrainer

            self.engine = BundleTrainer(job.model, self.name, device, job.task.kind == "segmentation")  # type: ignore[arg-type]

    def _load(self, params: Params, with_kept: bool) -> None:
        if with_kept and self._kept:
            params = {**params, **self._kept}
        try:
            self.model.load_state_dict(params, strict=True)
        except (RuntimeError, KeyError) as e:
            raise SiteError(self.name, f"parameters do not fit the model: {e}") from None

    def _stateful(self) -> bool:
        hook = self._hooks[Arm.FEDERATED]
        return (bool(hook.state_fields) or type(hook).state is not SiteHook.state or bool(self._local_keys)
                or any(type(f).state is not UpdateFilter.state for f in self.filters))

    def _snapshot(self) -> Params:
        """This site's state across federated rounds, as one flat tensor dict on the CPU."""
        out = {f"hook/{k}": v for k, v in self._hooks[Arm.FEDERATED].state().items()}
        out |= {f"kept/{k}": v.detach().to("cpu", copy=True) for k, v in self._kept.items()}
        for i, f in enumerate(self.filters):
            out |= {f"filter{i}/{k}": v.detach().to("cpu", copy=True) for k, v in f.state().items()}
        return out

    def _restore(self, state: SiteState) -> None:
        """Set this site's state to ``state`` (see :meth:`_snapshot`)."""
        groups: dict[str, Params] = {"hook": {}, "kept": {}, **{f"filter{i}": {} for i in range(len(self.filters))}}
        for key, t in state.tensors.items():
            part, _, name = key.partition("/")
            if part not in groups or not name:
                raise SiteError(self.name, f"its saved state has an entry '{key}' that this job's algorithm does not keep")
            groups[part][name] = t
        unknown = [k for k in groups["kept"] if k not in self._local_keys]
        if unknown:
            raise SiteError(self.name, f"its saved state keeps layer '{unknown[0]}', which the algorithm does not keep")
        try:
            self._hooks[Arm.FEDERATED].load_state(groups["hook"])
            for i, f in enumerate(self.filters):
                f.load_state(groups[f"filter{i}"])
        except ValueError as e:
            raise SiteError(self.name, f"its saved state does not fit the job's algorithm: {e}") from None
        self._kept = {k: t.clone().to(self.device) for k, t in groups["kept"].items()}

    def keep_state_in(self, file: StateFile) -> None:
        """Save this site's state to ``file`` after every federated round, and take up what
        it holds now (a site process started again)."""
        if self.states is not None:
            self.states.file = file
            self.states.resume_from_file()

    def fit(self, params: Params, plan: RoundPlan) -> Update:
        states = self.states if plan.arm is Arm.FEDERATED else None
        if states is None:
            return self._fit(params, plan)
        trained_from = states.begin(plan.round)
        try:
            update = self._fit(params, plan)
        except BaseException:
            states.failed()  # nothing of a failed round stays in the site's state
            raise
        states.end(plan.round)
        return dataclasses.replace(update, state_round=trained_from)

    def _fit(self, params: Params, plan: RoundPlan) -> Update:
        hook = self._hooks.get(plan.arm) or SiteHook()  # baselines train plainly
        probe = hook.probe(params, plan)
        if probe is not None:  # e.g. FedCE: the others' model, scored on this site's validation data
            hook.on_probe(self._score(probe))
        # federated training and fine-tuning start from this site's own local layers
        self._load(params, with_kept=plan.arm in (Arm.FEDERATED, Arm.FINETUNED))
        hook.on_train_start(self.model, plan)
        phases = hook.phases(plan.train, params)
        private = self.private if plan.arm is Arm.FEDERATED else None  # baselines train without DP-SGD
        # the phases that train the model the site sends; then the update; then those kept here
        steps, loss_sum = 0, 0.0
        for phase in (p for p in phases if p.keep is None):
            stats = self._run(phase, hook, plan, private)
            steps, loss_sum = steps + stats.num_steps, loss_sum + stats.mean_loss * stats.num_steps
        stats = TrainStats(num_steps=steps, mean_loss=loss_sum / max(steps, 1))
        extras = hook.on_train_end(self.model, stats.num_steps)
        trained = get_params(self.model)
        if plan.arm is Arm.FEDERATED and self._local_keys:
            self._kept = {k: trained.pop(k) for k in self._local_keys}
        for phase in (p for p in phases if p.keep is not None):
            self._run(phase, hook, plan, None)
            phase.keep(get_params(self.model))

        update = Update(
            site=self.name,
            round=plan.round,
            params=trained,
            num_examples=len(self.data.train),
            num_steps=stats.num_steps,
            metrics={Metric.LOSS: stats.mean_loss},
            extras=extras,
        )
        if plan.arm is Arm.FEDERATED:  # what leaves the site: DP, compression, masking
            sent = {k: v for k, v in params.items() if k not in self._local_keys}
            for f in self.filters:
                update = f.apply(update, sent, plan)
        return update

    def _score(self, params: Params) -> float | None:
        """The task's monitored metric of ``params`` (with this site's local layers) on the
        site's validation split."""
        self._load(params, with_kept=True)
        metrics = evaluate_split(self.model, self.data_for(Arm.FEDERATED).val, self.task, self.device, distances=False,
                                 where=f"site '{self.name}', probe model, val split")
        return metrics.get(self.monitor)

    def _run(self, phase: Phase, hook: SiteHook, plan: RoundPlan, private: SampleDP | None) -> TrainStats:
        """One phase of local training: from its starting point, with its hook."""
        if phase.start is not None:
            self._load(phase.start, with_kept=False)
        if phase.hook is not None:
            phase.hook.on_train_start(self.model, plan)
        if self.engine is not None:  # the job refuses algorithms whose phases need medfed's loop
            steps, loss = self.engine.train(self.model, self.data.train, phase.settings.local_epochs, phase.settings.seed)
            return TrainStats(num_steps=steps, mean_loss=loss)
        augment = self.mixed if self.mixed is not None and plan.arm is Arm.FEDERATED else self.augment
        return train_local(self.model, self.data_for(plan.arm).train, self.task, phase.settings, phase.hook or hook, self.device,
                           phase.frozen | self.frozen, augment, private=private)

    def data_for(self, arm: Arm) -> SiteData:
        """The site's data as ``arm``'s model sees it: with ``algorithm: harmofl``, the
        federated, fine-tuned and personalized models see the images amplitude-normalized
        toward this site's own average (algorithms/harmofl.py); the local and centralized
        baselines, and every other algorithm, the images as read."""
        if self.harmofl is None or arm in (Arm.LOCAL, Arm.CENTRALIZED):
            return self.data
        if self._harmonized is None:
            from medfed.algorithms.harmofl import harmonized

            h = self.harmofl
            self._harmonized = harmonized(self.data, h.ratio, h.amplitude_images, self.seed)
        return self._harmonized

    def exchange(self, topic: str, rnd: int, body: dict) -> dict:
        """Answer a protocol message of the update path (secure aggregation's key exchange
        and unmasking) for round ``rnd``, of FedDG's amplitude sharing before round 1, or
        of a relayed cyclic or swarm topology (site/peers.py)."""
        if topic in FEDDG_TOPICS and self.generalization is not None:
            return self._feddg(topic, body)
        if topic.startswith("peer.") and self.peers is not None:  # a relayed topology (site/peers.py)
            return self.peers.answer(topic, rnd, body)
        for f in self.filters:
            if isinstance(f, ProtocolParty) and topic in f.topics:
                return f.answer(topic, rnd, body)
        raise SiteError(self.name, f"no part of this site's update path answers '{topic}'")

    def _feddg(self, topic: str, body: dict) -> dict:
        """FedDG (generalization: feddg): send this site's band amplitudes, or take the
        consortium's bank and mix it into the training images from now on."""
        from medfed.data.frequency import AmplitudeMix, band_half, check_bank, site_bank

        g = self.generalization
        if topic == AMPLITUDES_TOPIC:
            bank = site_bank(self.data.train, g.bank_per_site, g.ratio, self.seed)
            return {"amplitudes": bank.tolist()}
        shape = self.data.train.shape
        limit = g.bank_per_site * int(body.get("sites", 1))
        bank = check_bank(body.get("bank"), shape[0], band_half(shape[1:], g.ratio), limit)
        self.mixed = AmplitudeMix(bank, g.ratio, g.probability, g.strength, then=self.augment)
        return {"ok": True, "spectra": int(bank.shape[0])}

    def evaluate(self, params: Params, splits: tuple[Split, ...], arm: Arm) -> list[EvalResult]:
        if arm is Arm.ZERO_FILLED:  # reconstruction: the undersampled input itself, whatever was sent
            return self._evaluate(ZeroFilledImage(), splits, arm)  # (a k-space input's zero-filled image)
        if arm is Arm.PERSONALIZED:  # the site's own personal model, whatever was sent
            personal = self._hooks[Arm.FEDERATED].personal_model()
            if personal is None:
                raise SiteError(self.name, "has no personal model to evaluate yet")
            params = personal
        # a fine-tuned model comes back whole, local layers included; only the federated
        # model needs this site's local layers put back
        self._load(params, with_kept=arm is Arm.FEDERATED)
        return self._evaluate(self.model, splits, arm)

    def _evaluate(self, model: nn.Module, splits: tuple[Split, ...], arm: Arm) -> list[EvalResult]:
        out = []
        for split in splits:
            data = self.data_for(arm).split(split.value)
            # surface distances (HD95) on test only: val picks the best model by its Dice
            metrics = evaluate_split(model, data, self.task, self.device, distances=split is Split.TEST,
                                     where=f"site '{self.name}', {arm.value} model, {split.value} split")
            out.append(EvalResult(site=self.name, split=split, num_examples=len(data), metrics=metrics))
        return out


def model_for(job: Job, data: SiteData, factory: ModelFactory | None = None) -> nn.Module:
    """An untrained network of ``job`` for the channels and spatial dims of ``data`` (its
    frozen parameters fixed; ``model.init`` is the server's: its weights arrive with round 1),
    or the network of ``factory`` when given (a run from Python with its own model)."""
    if factory is not None:
        return build_user_model(factory)
    return build_model(job.model, job.task, data.train.shape[0], spatial_dims=data.train.spatial_dims)


def build_site_augment(job: Job, spatial_dims: int):
    """The job's augmentation and patch cropping, or None when it has neither."""
    t = job.transforms
    if not t.augment and t.patch is None:
        return None
    from medfed.data.transforms import build_augment

    patch = tuple(t.patch) if t.patch is not None else None
    return build_augment(t.augment, patch, spatial_dims, job.task.kind == "segmentation")


def pooled_site_data(sites: list[SiteData], name: str) -> SiteData:
    """All sites' splits concatenated: the data of the centralized baseline (the caller
    leaves out held-out sites)."""
    from medfed.data.stream import concat_splits

    return SiteData(
        name=name,
        train=concat_splits([s.train for s in sites], name),
        val=concat_splits([s.val for s in sites], name),
        test=concat_splits([s.test for s in sites], name),
    )


def build_site_apps(
    job: Job, sites: list[SiteData], device: torch.device, pooled_name: str | None = None,
    factory: ModelFactory | None = None, state_dir: Path | None = None,
) -> dict[str, SiteApp]:
    """One app per site; plus the pooled pseudo-site when ``pooled_name`` is given. The
    apps run one at a time in this process, so they share one model buffer (built by
    ``factory`` when given, else from the job). ``state_dir``: where each site with
    algorithm state keeps it (taken up from there if it is already saved)."""
    if not sites:
        return {}
    shared = model_for(job, sites[0], factory)
    n = len(job.training_sites)  # once: counting them per site would make building the apps O(N^2)
    apps = {s.name: SiteApp(s, job, device, shared, num_sites=n) for s in sites}
    if state_dir is not None:
        keep_states(apps, job, state_dir)
    if pooled_name is not None:
        held_out = set(job.held_out)
        training = [s for s in sites if s.name not in held_out]
        apps[pooled_name] = SiteApp(pooled_site_data(training, pooled_name), job, device, shared, num_sites=n)
    return apps


def keep_states(apps: dict[str, SiteApp], job: Job, folder: Path) -> None:
    """Each app with algorithm state keeps it in ``folder`` (one file per site, named by
    the site's place in the job)."""
    job_hash, order = job.job_hash(), {name: i for i, name in enumerate(job.site_names)}
    for name, app in apps.items():
        if app.states is not None and name in order:
            app.keep_state_in(StateFile(folder / f"site-{order[name]:05d}.safetensors", job_hash, name))
