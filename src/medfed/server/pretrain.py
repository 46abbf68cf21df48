"""The pretraining stage of a run: federated self-supervised training of the network's encoder
before the supervised federated stage (``pretrain`` in the job; config/pretrain.py).

The stage is FedAvg through THE round loop (server/loop.run_federated) over the sites of
site/pretrain.py (:class:`~medfed.site.pretrain.PretrainSite`), whose training is THE local
step (site/train.py) with the SimCLR or BYOL hook: ``pretrain.rounds`` rounds, the job's
sampling, seeds and train settings (``pretrain.local_epochs`` and ``pretrain.lr`` where
given), whatever the job's algorithm, which trains the supervised stage. Each training site
takes part with every training image it holds, labeled or not: a site with ``unlabeled:
true`` (allowed with ``semi_supervised``) and the labels a study hides with
``labeled_fraction`` included. Without a ``semi_supervised`` section the supervised
stage's data leave the images without a label out, so for a job whose labels may be
missing (data/labels.needs_label_rules: a ``labeled_fraction``, a ``folder`` source) the
stage builds the sites' data once more with them (a file source is read twice).

Its records go to metrics.jsonl under arm ``pretrain``, so rounds 1..N of the stage never
collide with the federated arm's: the self-supervised loss per site and its example-weighted
mean (site ``all``) as ``ssl_loss`` on split ``train``, and the bytes sent. The stage ends
with :func:`pretrained_init`: the job's initial model with the encoder's entries replaced by
the pretrained ones; the head keeps its initial values. The federated (and fine-tuned)
arms start from it; the local and centralized baselines start from the job's initial model,
as a site alone (or a pool of every site's labels without federation) would: a federated
encoder already carries every site's images.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from medfed.config import FedAvgConfig, Job, SemiConfig
from medfed.core.types import Arm, Metric, Params
from medfed.data.base import SiteData
from medfed.models import get_params
from medfed.server.federation import build_federation
from medfed.server.loop import Recorder, RoundSummary, run_federated
from medfed.site.pretrain import NET, PretrainSite, ssl_network
from medfed.tracking.metrics import MEAN_SITE
from medfed.transport.inprocess import InProcessTransport

log = logging.getLogger("medfed")


def stage_job(job: Job) -> Job:
    """The job the stage's round loop runs: ``pretrain.rounds`` rounds of FedAvg with the
    stage's epochs and learning rate, evaluated once at the end (its sites score nothing)."""
    cfg = job.pretrain
    assert cfg is not None
    train = job.train.model_copy(update={
        "local_epochs": cfg.local_epochs if cfg.local_epochs is not None else job.train.local_epochs,
        "lr": cfg.lr if cfg.lr is not None else job.train.lr,
    })
    return job.model_copy(update={"rounds": cfg.rounds, "algorithm": FedAvgConfig(), "train": train,
                                  "eval_every": cfg.rounds, "contribution": None})


def pretraining_data(job: Job, sites: list[SiteData], given: bool) -> list[SiteData]:
    """Every site's data with all its training images: ``sites`` as the supervised
    stage has them when they already hold every image (a semi-supervised job, no label rule,
    datasets given from Python), else built again keeping the unlabeled ones."""
    from medfed.data.labels import needs_label_rules

    # held-out sites too: never drawn, but the round loop asks every site to evaluate
    if given or job.semi_supervised is not None or not needs_label_rules(job):
        return sites
    from medfed.data.sites import build_sites

    # the data as a semi-supervised job has them: the images without a label are kept, masked
    return build_sites(job.model_copy(update={"semi_supervised": SemiConfig(method="mean_teacher")}))


def pretrained_init(init: Params, pretrained: Params, encoder_keys: list[str]) -> Params:
    """``init`` (the job network's initial state dict) with its encoder's entries taken from
    the stage's final model ``pretrained`` (an SSLNet's state dict: ``net.<name>``)."""
    return {**init, **{k: pretrained[NET + k].clone() for k in encoder_keys}}


def as_pretrain(record: Recorder) -> Recorder:
    """``record`` for the stage's round loop: its ``federated`` records under arm ``pretrain``,
    the training loss as ``ssl_loss``."""

    def write(rnd: int, arm: str, site: str, split: str, metric: str, value: float | None) -> None:
        if arm == Arm.FEDERATED.value:
            arm = Arm.PRETRAIN.value
            metric = Metric.SSL_LOSS.value if metric == Metric.LOSS.value and split == "train" else metric
        record(rnd, arm, site, split, metric, value)

    return write


def run_pretrain(
    job: Job, sites: list[SiteData], model: nn.Module, device: torch.device, record: Recorder, given: bool = False,
) -> Params:
    """Run the stage (see the module docstring) from ``model``, the job's initial network (not
    changed: the stage trains a copy); return the supervised stage's initial state dict.
    ``given``: ``sites`` came from Python and hold every image there is."""
    cfg = job.pretrain
    assert cfg is not None, "run_pretrain: the job has no pretrain section"
    data = pretraining_data(job, sites, given)
    shape = tuple(data[0].train.shape)
    net = ssl_network(copy.deepcopy(model).to(device), shape, cfg, job.seed)
    net.to(device)
    log.info("pretraining stage: %d round(s) of %s over %d site(s) (%s of the encoder, head '%s' left as "
             "initialized)", cfg.rounds, cfg.method, len(data), f"{len(net.encoder_keys())} entries", net.head)
    stage = stage_job(job)
    apps = {s.name: PretrainSite(s, job, net, device) for s in data}
    transport = InProcessTransport(apps)  # type: ignore[arg-type]  # PretrainSite answers fit/evaluate as SiteApp does
    federation = build_federation(stage, net, transport, {s.name: len(s.train) for s in data}, noise_seed=job.seed)
    write = as_pretrain(record)

    def on_round(s: RoundSummary, params: Params) -> None:
        write(s.round, Arm.FEDERATED.value, MEAN_SITE, "train", Metric.LOSS.value, s.train_loss)
        log.info("pretraining round %d/%d: ssl_loss %s", s.round, cfg.rounds,
                 "n/a" if s.train_loss is None else f"{s.train_loss:.4f}")

    final = run_federated(federation, transport, get_params(net), write, on_round)
    return pretrained_init(get_params(model), final, net.encoder_keys())

