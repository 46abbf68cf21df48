"""Federated self-supervised pretraining (config/pretrain.py, site/pretrain.py,
server/pretrain.py): NT-Xent as computed by hand, BYOL's target the moving average of the
online network, a pretraining round trains the encoder and not the head, the supervised
stage starts from the pretrained encoder, an unlabeled-only site takes part, the refusals,
and a 2 + 2 round run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from medfed.algorithms.base import SiteHook
from medfed.config import ModelConfig, PretrainConfig, TaskConfig, parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, RoundPlan, TrainSettings
from medfed.data.base import ArraySplit, SiteData
from medfed.models import build_model, get_params
from medfed.site.pretrain import BYOL, NET, PretrainSite, SSLNet, TwoViews, encoder_head, nt_xent, ssl_network
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")
CPU = torch.device("cpu")
VIEW = [{"name": "intensity", "scale": 0.2, "shift": 0.1, "prob": 1.0}]


def _split(n=24, labeled=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    mask = None if labeled is None else torch.arange(n) < labeled
    return ArraySplit(x, y if mask is None else torch.where(mask, y, 0), labeled=mask)


def _settings(**kw):
    base = dict(local_epochs=1, batch_size=8, lr=0.05, optimizer="sgd", momentum=0.0, weight_decay=0.0, seed=3)
    return TrainSettings(**{**base, **kw})


def _plan(rnd=1):
    return RoundPlan(job_id="j", round=rnd, arm=Arm.FEDERATED, train=_settings())


def _net(method="simclr", **kw) -> SSLNet:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)
    return ssl_network(model, (1, 16, 16), PretrainConfig(method=method, rounds=1, views=VIEW, **kw), seed=0)


# --------------------------------------------------------------------------- the losses and the network


def test_nt_xent_equals_the_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    t = 0.5
    z = [[a / math.hypot(a, b), b / math.hypot(a, b)] for a, b in ([1.0, 0.0], [1.0, 1.0], [2.0, 0.5], [0.0, 1.0])]
    partner = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        sims = {k: (z[i][0] * z[k][0] + z[i][1] * z[k][1]) / t for k in range(4) if k != i}
        total += -sims[partner[i]] + math.log(sum(math.exp(s) for s in sims.values()))
    assert nt_xent(z1, z2, t).item() == pytest.approx(total / 4, rel=1e-6)
    # the loss falls as the views of one image agree more than those of different images
    assert nt_xent(z1, z1, t) < nt_xent(z1, z1.flip(0), t)


def test_the_encoder_is_the_network_without_its_head():
    net = _net()
    assert net.head == "head"
    assert net.head_keys() == ["head.weight", "head.bias"]
    assert all(not k.startswith("head.") for k in net.encoder_keys()) and "features.0.0.weight" in net.encoder_keys()
    assert all(not p.requires_grad for p in net.net.head.parameters())
    assert net.project(torch.rand(3, 1, 16, 16)).shape == (3, 64)
    pairs = torch.rand(3, 2, 16, 16)
    net.eval()  # one pass over both views gives each view's projections, view a's first
    assert torch.allclose(net(pairs), torch.cat([net.project(pairs[:, :1]), net.project(pairs[:, 1:])]), atol=1e-6)
    with pytest.raises(ValueError, match="two views of 1-channel images"):
        net(torch.rand(3, 1, 16, 16))


def test_two_views_are_seeded_and_differ():
    views = TwoViews(PretrainConfig(method="simclr", rounds=1, views=VIEW).view_steps(), 2)
    x, y = torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.int64)
    pairs, labels = views(x, y, 5)
    assert pairs.shape == (4, 2, 16, 16) and labels is y
    assert torch.equal(pairs, views(x, y, 5)[0]) and not torch.equal(pairs, views(x, y, 6)[0])
    assert not torch.allclose(pairs[:, :1], pairs[:, 1:])


def test_a_network_without_an_encoder_is_refused_naming_pretrain():
    with pytest.raises(ConfigError, match="pretrain: every weight of the network"):
        encoder_head(nn.Sequential(nn.Flatten(), nn.Linear(256, 2)))
    with pytest.raises(ConfigError, match="pretrain: the network Identity has no top-level layer"):
        encoder_head(nn.Identity())

    class Reversed(nn.Module):  # the layer registered last is called first: no encoder before it
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(2, 2, 3)
            self.stem = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.body(self.stem(x))

    cfg = PretrainConfig(method="simclr", rounds=1)
    with pytest.raises(ConfigError, match="'stem' .* takes the network's input itself"):
        ssl_network(Reversed(), (1, 8, 8), cfg, 0)


def test_byol_target_is_the_moving_average_of_the_online_network():
    seen = []

    class Recording(BYOL):
        def on_step_end(self, model):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            super().on_step_end(model)

    net = _net("byol", ema=0.8)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = PretrainConfig(method="byol", rounds=1, ema=0.8, views=VIEW)
    hook = Recording(cfg)
    hook.on_train_start(net, _plan())
    data = _split(labeled=0)
    stats = train_local(net, data, ClassificationTask(TASK), _settings(), hook, CPU,
                        augment=TwoViews(cfg.view_steps(), 2))
    assert stats.num_steps == len(seen) == 3
    expected = {k: v.float() for k, v in start.items()}
    for online in seen:
        expected = {k: 0.8 * expected[k] + 0.2 * online[k].float() for k in expected}
    for k, v in hook.target.items():
        if v.is_floating_point():
            assert torch.allclose(v, expected[k], atol=1e-6), k
    moved = [k for k in hook.target if hook.target[k].is_floating_point() and not torch.equal(hook.target[k], seen[-1][k])]
    assert moved  # the target lags the online network
    # it is site state: saved and taken up
    fresh = BYOL(PretrainConfig(method="byol", rounds=1, views=VIEW))
    fresh.load_state(hook.state())
    assert all(torch.equal(fresh.target[k], hook.target[k]) for k in hook.target)


def _job_raw(**over):
    raw = {
        "name": "pretrain", "rounds": 2, "threads": 1, "seed": 1, "output": "out",
        "data": {"source": "synthetic", "image_size": 16, "labeled_fraction": 0.5,
                 "sites": [{"name": "a", "n_train": 24, "n_val": 8, "n_test": 8},
                           {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8}]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
        "train": {"batch_size": 8, "lr": 0.05, "momentum": 0.0},
        "pretrain": {"method": "simclr", "rounds": 2, "views": VIEW},
    }
    return {**raw, **over}


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_a_pretraining_round_changes_the_encoder_not_the_head(method):
    job = parse_job(_job_raw(pretrain={"method": method, "rounds": 1, "views": VIEW}))
    net = _net(method)
    before = get_params(net)
    site = PretrainSite(SiteData("a", _split(labeled=24), _split(8), _split(8)), job, net, CPU)
    update = site.fit(before, _plan())
    assert update.num_steps == 3 and update.num_examples == 24 and math.isfinite(update.metrics["loss"])
    for k in net.head_keys():
        assert torch.equal(update.params[NET + k], before[NET + k]), k
    changed = [k for k in net.encoder_keys() if not torch.equal(update.params[NET + k], before[NET + k])]
    assert "features.0.0.weight" in changed
    assert not torch.equal(update.params["projector.0.weight"], before["projector.0.weight"])


def test_an_unlabeled_only_site_takes_part_in_pretraining():
    job = parse_job(_job_raw())
    net = _net()
    before = get_params(net)
    unlabeled = _split(labeled=0)
    plain = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)  # supervised training: no label, no step
    assert train_local(plain, unlabeled, ClassificationTask(TASK), _settings(), SiteHook(), CPU).num_steps == 0
    update = PretrainSite(SiteData("c", unlabeled, _split(0), _split(0)), job, net, CPU).fit(before, _plan())
    assert update.num_steps == 3 and update.num_examples == 24
    assert not torch.equal(update.params[NET + "features.0.0.weight"], before[NET + "features.0.0.weight"])
    # through the job: a site with unlabeled: true (allowed with semi_supervised) brings all its images
    from medfed.data.sites import build_sites
    from medfed.server.pretrain import pretraining_data

    raw = _job_raw(semi_supervised={"method": "mean_teacher"})
    raw["data"]["sites"][1]["unlabeled"] = True
    job = parse_job(raw)
    site_b = pretraining_data(job, build_sites(job), given=False)[1]
    assert site_b.name == "b" and len(site_b.train) == 16 and not bool(site_b.train.labeled.any())
    update = PretrainSite(site_b, job, net, CPU).fit(before, _plan())
    assert update.num_examples == 16 and update.num_steps == 2


def test_the_stage_trains_on_the_images_whose_labels_are_hidden():
    from medfed.data.sites import build_sites
    from medfed.server.pretrain import pretraining_data

    job = parse_job(_job_raw())
    supervised = build_sites(job)
    every = pretraining_data(job, supervised, given=False)
    assert [len(s.train) for s in supervised] == [12, 8]  # labeled_fraction 0.5: the others left out
    assert [len(s.train) for s in every] == [24, 16]


# --------------------------------------------------------------------------- the job


def _refusal(**over) -> str:
    with pytest.raises(ConfigError) as e:
        parse_job(_job_raw(**over), "job.yaml")
    return str(e.value)


@pytest.mark.parametrize("over, message", [
    ({"pretrain": {"method": "simclr", "rounds": 0}}, "pretrain.rounds: must be >= 1"),
    ({"pretrain": {"method": "simclr", "rounds": 1, "temperature": 0}}, "pretrain.temperature: must be > 0"),
    ({"pretrain": {"method": "simclr", "rounds": 1, "temperature": -1}}, "pretrain.temperature: must be > 0"),
    ({"pretrain": {"method": "byol", "rounds": 1, "temperature": 0.5}}, "temperature: is SimCLR's"),
    ({"pretrain": {"method": "simclr", "rounds": 1, "ema": 0.9}}, "ema: is BYOL's"),
    ({"pretrain": {"method": "moco", "rounds": 1}}, "pretrain.method"),
    ({"pretrain": {"method": "simclr", "rounds": 1, "views": []}}, "views: is empty"),
    ({"task": {"kind": "reconstruction"}, "model": {"name": "unet"},
      "data": {"source": "synthetic_phantoms", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}},
     "pretrain: pretrains a classifier's encoder; task.kind 'reconstruction'"),
    ({"task": {"kind": "segmentation", "num_classes": 2}, "model": {"name": "unet"},
      "data": {"source": "synthetic_segmentation", "image_size": 16, "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}},
     "task.kind 'segmentation' is not supported"),
    ({"data": {"source": "medmnist", "path": "x.npz", "dims": 3, "partition": {"method": "iid", "sites": ["a", "b"]}}},
     "pretrain: supports 2D images only"),
    ({"topology": {"kind": "cyclic"}}, "pretrain: runs with topology.kind: server only"),
    ({"transport": "pool"}, "pretrain: runs with transport: inprocess only"),
    ({"privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}},
      "model": {"name": "small_cnn", "width": 4, "norm": "group"}}, "privacy.dp: the pretraining stage's updates"),
    ({"privacy": {"secure_aggregation": {}}}, "privacy.secure_aggregation: the pretraining stage's updates"),
    ({"compression": {"method": "topk", "fraction": 0.1}}, "compression: applies to the supervised stage"),
    ({"data": {"source": "synthetic", "image_size": 16, "sites": [{"name": "a", "n_train": 8, "n_test": 4},
                                                                   {"name": "b", "n_train": 8, "n_test": 4, "unlabeled": True}]}},
     "data.sites[1].unlabeled: site 'b' has no labels: it would take part in pretraining"),
])
def test_refusals_name_the_field(over, message):
    assert message in _refusal(**over)


def test_a_job_without_the_section_keeps_its_hash():
    raw = _job_raw()
    without = {k: v for k, v in raw.items() if k != "pretrain"}
    assert "\npretrain:" not in parse_job(without).to_yaml() and "\npretrain:" in parse_job(raw).to_yaml()
    assert parse_job(without).job_hash() != parse_job(raw).job_hash()


def test_resume_and_deployment_are_refused():
    from medfed.server.deploy import serve_job
    from medfed.server.resume import check_resumable

    job = parse_job(_job_raw())
    with pytest.raises(ConfigError, match="--resume: a run with pretrain has two stages"):
        check_resumable(job, from_python=False)
    with pytest.raises(ConfigError, match="pretrain: the self-supervised stage runs in simulation only for now"):
        serve_job(job, kit=None)  # type: ignore[arg-type]  # refused before the kit is used


# --------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """A 2 + 2 round run (SimCLR, then FedAvg) with what the runner handed each stage."""
    import medfed.server.pretrain as pretrain_module
    import medfed.server.runner as runner
    from medfed.server.runner import run_job

    seen: dict = {}
    real_stage, real_train = pretrain_module.run_pretrain, runner.train_federation

    def stage(job, sites, model, device, record, given=False):
        seen["init"] = get_params(model)
        seen["pretrained"] = real_stage(job, sites, model, device, record, given)
        return seen["pretrained"]

    def train(federation, transport, params, *a, **kw):
        seen["federated_start"] = {k: v.clone() for k, v in params.items()}
        return real_train(federation, transport, params, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(pretrain_module, "run_pretrain", stage)
    mp.setattr(runner, "train_federation", train)
    try:
        out = tmp_path_factory.mktemp("pretrain") / "run"
        result = run_job(parse_job(_job_raw(output=str(out), compare=["local"])))
    finally:
        mp.undo()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.run_dir, records, seen


def test_the_supervised_stage_starts_from_the_pretrained_encoder(whole_run):
    _, _, seen = whole_run
    init, start = seen["init"], seen["federated_start"]
    assert start.keys() == init.keys()
    assert all(torch.equal(start[k], seen["pretrained"][k]) for k in start)
    assert torch.equal(start["head.weight"], init["head.weight"]) and torch.equal(start["head.bias"], init["head.bias"])
    assert not torch.equal(start["features.0.0.weight"], init["features.0.0.weight"])


def test_a_run_records_both_stages_apart(whole_run):
    run_dir, records, _ = whole_run
    ssl = {(r["round"], r["site"]) for r in records if r["arm"] == "pretrain" and r["metric"] == "ssl_loss"}
    assert ssl == {(r, s) for r in (1, 2) for s in ("a", "b", "all")}
    assert all(r["split"] == "train" for r in records if r["arm"] == "pretrain")
    federated = {r["round"] for r in records if r["arm"] == "federated" and r["metric"] == "auc"}
    assert federated == {1, 2}
    assert not any(r["arm"] == "federated" and r["metric"] == "ssl_loss" for r in records)
    # local starts from the job's initial model: its rounds are there, apart from both stages
    assert {r["round"] for r in records if r["arm"] == "local" and r["metric"] == "auc"} == {1, 2}
    report = (run_dir / "report.html").read_text()
    assert "Self-supervised pretraining (ssl_loss)" in report
