"""Split learning (``topology: {kind: split}``): the cut network, the site's step against the
server's middle, sequential split learning and SplitFed v1 on real runs, bytes at the cut,
and what the job and the network refuse."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file

import medfed
from medfed.algorithms.base import SiteHook
from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import TrainSettings
from medfed.cut import cut_model
from medfed.data.base import ArraySplit
from medfed.models import SmallCNN
from medfed.server import split as server_split
from medfed.server.split import MiddleSession
from medfed.site.split import InProcessChannel, train_site_parts
from medfed.site.train import train_local
from medfed.tasks import build_task

JOB = {
    "name": "t", "output": "o", "rounds": 2,
    "data": {"source": "synthetic", "sites": [{"name": "a", "n_train": 10, "n_test": 5},
                                              {"name": "b", "n_train": 30, "n_test": 5}]},
    "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
    "topology": {"kind": "split", "cut": "features.0"},
}


# ---- the cut network


def test_the_three_parts_compute_the_network_and_share_its_layers():
    torch.manual_seed(0)
    model = SmallCNN(1, 1, width=4).eval()
    parts = cut_model(model, "features.1")
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(parts.back(parts.middle(parts.front(x))), model(x))
    assert parts.site_keys == {k for k in model.state_dict() if k.startswith(("features.0.", "features.1.", "head."))}
    assert parts.middle_keys == set(model.state_dict()) - parts.site_keys
    with torch.no_grad():  # the parts are views of the network's own layers
        model.head.bias.fill_(3.0)
    assert float(parts.back.state_dict()["head.bias"]) == 3.0


@pytest.mark.parametrize("cut,head,expected", [
    ("feature.0", None, "topology.cut: the network has no module 'feature.0'; did you mean features.0"),
    ("features.0", "tail", "topology.head: the network has no module 'tail'"),
    ("head", None, "topology.cut: 'head' does not end before the last top-level layer 'head' begins"),
    ("features.2", "pool", "topology.cut: 'features.2' leaves nothing between it and topology.head 'pool'"),
    ("features.2", "features.1", "topology.cut: 'features.2' does not end before topology.head 'features.1'"),
])
def test_a_cut_the_network_cannot_take_is_refused_naming_the_field(cut, head, expected):
    with pytest.raises(ConfigError) as e:
        cut_model(SmallCNN(1, 1, width=4), cut, head)
    assert expected in str(e.value)


def test_a_cut_across_a_skip_connection_is_refused_with_the_cuts_that_work():
    from monai.networks import nets

    resnet = nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=1)
    cut_model(resnet, "layer2")  # between residual blocks: one tensor crosses
    with pytest.raises(ConfigError) as e:
        cut_model(resnet, "layer1.0.conv1")  # inside a block: the block's input crosses too
    msg = str(e.value)
    assert msg.startswith("topology.cut: 2 tensors cross the cut after 'layer1.0.conv1'") and "'layer2'" in msg
    unet = nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    with pytest.raises(ConfigError, match="split learning cannot cut it"):
        cut_model(unet, "model.0")  # one top-level layer, skip connections inside


def test_a_network_with_a_forward_hook_is_refused():
    model = SmallCNN(1, 1, width=4)
    model.register_forward_hook(lambda m, a, out: out + 1)
    with pytest.raises(ConfigError, match="topology.cut: the network itself has a forward hook"):
        cut_model(model, "features.0")


# ---- the site's step


def test_the_split_step_trains_exactly_what_the_local_step_trains_unsplit():
    """The same batches, seed and optimizer (Adam with weight decay here): the cut changes
    nothing in the computation."""
    torch.manual_seed(0)
    data = ArraySplit(torch.randn(20, 1, 16, 16), torch.randint(0, 2, (20,)))
    job = parse_job({**copy.deepcopy(JOB), "topology": {"kind": "server"}})
    task = build_task(job)
    settings = TrainSettings(local_epochs=2, batch_size=8, lr=0.01, optimizer="adam", momentum=0.0,
                             weight_decay=0.01, seed=5)
    plain, split = SmallCNN(1, 1, width=4), SmallCNN(1, 1, width=4)
    split.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    plain_stats = train_local(plain, data, task, settings, SiteHook(), cpu)
    parts = cut_model(split, "features.0")
    channel = InProcessChannel(MiddleSession(parts.middle, settings, cpu))
    split_stats = train_site_parts(parts, data, task, settings, channel, cpu)
    assert split_stats.num_steps == plain_stats.num_steps == 6  # 2 epochs of 8 + 8 + 4
    assert split_stats.mean_loss == pytest.approx(plain_stats.mean_loss, rel=1e-6)
    a, b = plain.state_dict(), split.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert not torch.equal(a["head.weight"], SmallCNN(1, 1, width=4).state_dict()["head.weight"])  # it trained
    # per batch: activations (B, 4, 8, 8) up and their gradient down; (B, 16) down and its gradient up
    per_example = (4 * 8 * 8 + 16) * 4
    assert channel.sent == channel.received == 2 * 20 * per_example


# ---- real runs


def _real(tmp_path, out, topology=None, sites=1, **extra):
    job = {"name": "split", "seed": 1, "output": str(tmp_path / out), "rounds": 2, "threads": 1, "device": "cpu",
           "data": {"source": "synthetic", "image_size": 16, "sites": [
               {"name": f"s{i}", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5} for i in range(sites)]},
           "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
           "train": {"batch_size": 8, "lr": 0.05}, **extra}
    if topology is not None:
        job["topology"] = topology
    result = medfed.run(job, progress=False)
    return load_file(result.run_dir / "model_final.safetensors"), result.metrics


def _close(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_split_learning_on_one_site_equals_training_the_unsplit_network(tmp_path):
    split, metrics = _real(tmp_path, "split", {"kind": "split", "cut": "features.0"})
    plain, _ = _real(tmp_path, "plain")  # FedAvg with one site: the site's plain local training
    assert _close(split, plain)
    # bytes at the cut per round: 2 batches of 8; activations (8, 4, 8, 8) and gradients (8, 16), float32
    crossing = 2 * 8 * (4 * 8 * 8 + 16) * 4
    site_parts = 4 * 9 * 4 + 4 * 4 * 4 + 8 + 16 * 4 + 4  # conv, norm (4 vectors + a step count), head
    sent = [r["value"] for r in metrics if r["metric"] == "bytes_sent" and r["site"] == "s0"]
    received = [r["value"] for r in metrics if r["metric"] == "bytes_received" and r["site"] == "s0"]
    assert sent == received == [crossing + site_parts] * 2


def test_sequential_split_learning_passes_the_site_parts_on_as_cyclic_passes_the_model(tmp_path):
    split, _ = _real(tmp_path, "split", {"kind": "split", "cut": "features.1"}, sites=3)
    cyclic, _ = _real(tmp_path, "cyclic", {"kind": "cyclic"}, sites=3)
    assert _close(split, cyclic)


def test_splitfed_v1_is_fedavg_of_the_whole_network_and_runs_with_the_baselines(tmp_path):
    splitfed, metrics = _real(tmp_path, "splitfed", {"kind": "split", "cut": "features.0", "parallel": True}, sites=3,
                              compare=["local", "centralized"])
    fedavg, _ = _real(tmp_path, "fedavg", sites=3)
    assert _close(splitfed, fedavg)
    arms = {r["arm"] for r in metrics if r["metric"] == "auc" and r["split"] == "test"}
    assert arms == {"federated", "local", "centralized"}


def test_each_site_starts_from_the_round_start_in_splitfed_and_from_the_last_site_in_sequence(tmp_path, monkeypatch):
    seen = []
    real = server_split.fit_split

    def spy(app, params, plan, channel, cut, head, **kw):
        seen.append((plan.round, app.name, params["head.weight"].clone()))
        update = real(app, params, plan, channel, cut, head, **kw)
        seen.append((plan.round, app.name + " sent", update.params["head.weight"].clone()))
        return update

    monkeypatch.setattr(server_split, "fit_split", spy)
    _real(tmp_path, "splitfed", {"kind": "split", "cut": "features.0", "parallel": True}, sites=2, rounds=1)
    (_, _, a_in), (_, _, a_out), (_, _, b_in), (_, _, b_out) = seen
    assert torch.equal(a_in, b_in) and not torch.equal(a_out, b_in)  # both from the round's start
    seen.clear()
    _real(tmp_path, "sequential", {"kind": "split", "cut": "features.0"}, sites=2, rounds=1)
    (_, _, a_in), (_, _, a_out), (_, _, b_in), (_, _, b_out) = seen
    assert torch.equal(a_out, b_in) and not torch.equal(a_in, b_in)  # b goes on from what a sent


def test_a_site_failing_mid_turn_is_skipped_and_the_middle_put_back(tmp_path, monkeypatch, caplog):
    real = server_split.fit_split

    def failing_after(batches):
        def fit(app, params, plan, channel, cut, head, **kw):
            if app.name != "s1":
                return real(app, params, plan, channel, cut, head, **kw)
            calls = {"n": 0}
            forward = channel.forward

            def counted(activations):
                calls["n"] += 1
                if calls["n"] > batches:
                    raise RuntimeError("connection lost")
                return forward(activations)

            channel.forward = counted
            return real(app, params, plan, channel, cut, head, **kw)
        return fit

    topology = {"kind": "split", "cut": "features.0"}
    monkeypatch.setattr(server_split, "fit_split", failing_after(1))  # the server's middle trained on one batch of s1
    with caplog.at_level(logging.WARNING, logger="medfed"):
        mid_turn, metrics = _real(tmp_path, "mid", topology, sites=3)
    assert "split round 1: site 's1' skipped: RuntimeError: connection lost" in caplog.text
    monkeypatch.setattr(server_split, "fit_split", failing_after(0))  # s1 fails before its first batch
    at_start, _ = _real(tmp_path, "start", topology, sites=3)
    assert _close(mid_turn, at_start)
    assert not any(r["site"] == "s1" and r["metric"] == "bytes_sent" for r in metrics)


# ---- the job


def _job(**extra):
    return {**copy.deepcopy(JOB), **extra}


@pytest.mark.parametrize("extra,expected", [
    ({"algorithm": {"name": "fedprox"}}, "algorithm.name: 'fedprox' changes local training or the server's rule, but topology.kind: split"),
    ({"privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}}},
     "privacy.dp: topology.kind: split sends a site's activations"),
    ({"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}}},
     "no DP accounting here covers them"),
    ({"privacy": {"secure_aggregation": {}}}, "privacy.secure_aggregation: topology.kind: split"),
    ({"compression": {"method": "topk", "fraction": 0.1}}, "compression: updates are encoded"),
    ({"robust": {"rule": "median"}}, "robust: a robust rule merges whole models, but topology.kind: split"),
    ({"transport": "pool"}, "transport: pool runs each site in a process of its own, but the per-batch exchange"),
    ({"topology": {"kind": "split"}}, "topology.cut: is required"),
    ({"topology": {"kind": "split", "cut": "features", "head": "features.2"}},
     "head 'features.2' is inside cut 'features'"),
    ({"topology": {"kind": "split", "cut": "features.0", "parallel": "sometimes"}}, "topology.parallel"),
])
def test_what_split_learning_cannot_do_is_refused_naming_both_fields(extra, expected):
    with pytest.raises(ConfigError) as e:
        parse_job(_job(**extra))
    assert expected in str(e.value)
    assert "topology.split" not in str(e.value)


def test_validate_builds_the_network_and_refuses_an_unknown_cut():
    job = parse_job(_job())
    assert job.topology.label.startswith("split learning at 'features.0', U-shaped, sequential")
    medfed.validate(_job())
    with pytest.raises(ConfigError, match="topology.cut: the network has no module 'layer9'"):
        medfed.validate(_job(topology={"kind": "split", "cut": "layer9"}))


def test_a_run_refuses_an_unknown_cut_before_round_1(tmp_path):
    job = _job(output=str(tmp_path / "out"), topology={"kind": "split", "cut": "features.7"})
    with pytest.raises(ConfigError, match="topology.cut: the network has no module 'features.7'"):
        medfed.run(job, progress=False)


PlainTurns = server_split.InProcessTurns


class ThreadedTurns(PlainTurns):
    """The turns of a wave at once, each in a thread of its own with its own copy of the
    network (in-process sites share one), as the deployment's hub runs SplitFed's turns
    against sites in processes of their own.

    torch.fx's tracer patches every module call process-wide while it traces, so a thread
    that traces would break another thread's forward pass; a deployed site traces in a
    process of its own. Here each copy is cut on the calling thread before any turn
    starts, and the turn takes that cut (see ``precut``)."""

    cuts: dict = {}

    def run(self, turns):
        from concurrent.futures import ThreadPoolExecutor

        import medfed.site.split as site_split

        apps = {}
        for t in turns:  # copies and cuts made here, one after another, before any thread runs
            apps[t.site] = copy.copy(self.apps[t.site])
            apps[t.site].model = copy.deepcopy(apps[t.site].model)
            model = apps[t.site].model
            ThreadedTurns.cuts[id(model)] = site_split.cut_model(model, self.topology.cut, self.topology.head,
                                                                 self.topology.u_shaped)

        def one(t):
            return PlainTurns({t.site: apps[t.site]}, self.topology).run([t])[0]

        try:
            with ThreadPoolExecutor(len(turns)) as pool:
                return list(pool.map(one, turns))
        finally:
            ThreadedTurns.cuts.clear()


def test_splitfed_turns_run_at_once_give_what_they_give_one_after_another(tmp_path, monkeypatch):
    assert_threaded_equals_sequential(tmp_path, monkeypatch, {"kind": "split", "cut": "features.0", "parallel": True})


def assert_threaded_equals_sequential(tmp_path, monkeypatch, topology: dict) -> None:
    """SplitFed of ``topology`` with its turns in threads gives the metrics of its turns one
    after another (seconds aside)."""
    import medfed.site.split as site_split

    one_by_one, metrics = _real(tmp_path, "one", topology, sites=3)
    monkeypatch.setattr(server_split, "InProcessTurns", ThreadedTurns)
    cut = site_split.cut_model

    def precut(model, *args, **kwargs):  # a turn's thread takes the cut made before it started
        made = ThreadedTurns.cuts.pop(id(model), None)
        return made if made is not None else cut(model, *args, **kwargs)

    monkeypatch.setattr(site_split, "cut_model", precut)
    at_once, threaded = _real(tmp_path, "once", topology, sites=3)
    assert _close(one_by_one, at_once)
    values = [(r["round"], r["site"], r["metric"], r["split"], r["value"]) for r in metrics if r["metric"] != "seconds"]
    assert values == [(r["round"], r["site"], r["metric"], r["split"], r["value"]) for r in threaded
                      if r["metric"] != "seconds"]


class Stop(KeyboardInterrupt):
    """A stop raised where a kill could land."""


@pytest.mark.parametrize("parallel,u_shaped", [(False, True), (True, True), (False, False), (True, False)])
def test_a_stopped_split_run_resumes_to_the_run_never_stopped(parallel, u_shaped, tmp_path, monkeypatch):
    """The whole state of split learning between rounds is the network (no optimizer
    outlives a turn), so the run's resume point is enough."""
    import json
    import os

    from medfed.server import runner

    def job(name):
        return parse_job({"name": "resume", "rounds": 3, "threads": 1, "seed": 3, "output": str(tmp_path / name),
                          "data": {"source": "synthetic", "image_size": 16, "sites": [
                              {"name": n, "n_train": 16, "n_val": 8, "n_test": 8} for n in ("a", "b", "c")]},
                          "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
                          "train": {"batch_size": 8, "lr": 0.05},
                          "topology": {"kind": "split", "cut": "features.1", "parallel": parallel,
                                       "u_shaped": u_shaped}})

    straight = runner.run_job(job("straight")).run_dir
    real = server_split.fit_split

    def stopping(app, params, plan, channel, cut, head, **kw):
        if plan.round == 3 and app.name == "c":
            raise Stop()
        return real(app, params, plan, channel, cut, head, **kw)

    with monkeypatch.context() as m:
        m.setattr(server_split, "fit_split", stopping)
        with pytest.raises(Stop):
            runner.run_job(job("stopped"))
    partial = list(tmp_path.glob(".stopped.partial-*"))
    assert len(partial) == 1
    os.rename(partial[0], tmp_path / ".stopped.partial-999999999")  # its process is gone
    resumed = runner.run_job(job("stopped"), resume=True).run_dir
    assert json.loads((resumed / "run.json").read_text())["resumed"] is True
    a, b = load_file(straight / "model_final.safetensors"), load_file(resumed / "model_final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()


def test_examples_without_a_label_take_no_part_in_the_loss_as_in_the_local_step(tmp_path):
    from medfed.config.data import SyntheticData

    if "labeled_fraction" not in SyntheticData.model_fields:
        pytest.skip("data.labeled_fraction is not part of this tree")
    data = {"source": "synthetic", "image_size": 16, "labeled_fraction": 0.3, "sites": [
        {"name": "s0", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5}]}
    split, _ = _real(tmp_path, "split", {"kind": "split", "cut": "features.0"}, data=data)
    plain, _ = _real(tmp_path, "plain", data=data)
    everything, _ = _real(tmp_path, "all", {"kind": "split", "cut": "features.0"})
    assert _close(split, plain) and not _close(split, everything)
