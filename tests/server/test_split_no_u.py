"""Split learning without the U (``topology: {kind: split, u_shaped: false}``): the network
cut in two, the server holding the rest and the loss, each batch's labels sent with its
activations; the same computation as unsplit training, sequential and SplitFed, and what is
refused."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from medfed.algorithms.base import SiteHook
from medfed.config import parse_job
from medfed.core.errors import ConfigError, ModelError
from medfed.core.types import TrainSettings
from medfed.cut import cut_model
from medfed.data.base import ArraySplit
from medfed.models import SmallCNN
from medfed.server.split import MiddleSession
from medfed.site.split import InProcessChannel, train_site_parts
from medfed.site.train import train_local
from medfed.tasks import build_task
from server.test_split import JOB, _close, _real, assert_threaded_equals_sequential

NO_U = {"kind": "split", "cut": "features.0", "u_shaped": False}


def test_the_network_is_cut_in_two_the_site_keeping_the_front_alone():
    torch.manual_seed(0)
    model = SmallCNN(1, 1, width=4).eval()
    parts = cut_model(model, "features.1", u_shaped=False)
    x = torch.randn(3, 1, 16, 16)
    assert parts.back is None and not parts.u_shaped
    assert torch.equal(parts.middle(parts.front(x)), model(x))
    assert parts.site_keys == {k for k in model.state_dict() if k.startswith(("features.0.", "features.1."))}
    assert parts.middle_keys == set(model.state_dict()) - parts.site_keys  # head included: the server's
    with pytest.raises(ConfigError, match="topology.cut: 'head' leaves nothing after it for the server"):
        cut_model(model, "head", u_shaped=False)
    with pytest.raises(ConfigError, match="topology.head: 'head' with topology.u_shaped: false"):
        cut_model(model, "features.0", "head", u_shaped=False)


def test_the_step_without_the_u_trains_exactly_what_the_local_step_trains_unsplit():
    torch.manual_seed(0)
    data = ArraySplit(torch.randn(20, 1, 16, 16), torch.randint(0, 2, (20,)))
    task = build_task(parse_job({**copy.deepcopy(JOB), "topology": {"kind": "server"}}))
    settings = TrainSettings(local_epochs=2, batch_size=8, lr=0.01, optimizer="adam", momentum=0.0,
                             weight_decay=0.01, seed=5)
    plain, split = SmallCNN(1, 1, width=4), SmallCNN(1, 1, width=4)
    split.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    plain_stats = train_local(plain, data, task, settings, SiteHook(), cpu)
    parts = cut_model(split, "features.0", u_shaped=False)
    session = MiddleSession(parts.middle, settings, cpu, task.loss)
    channel = InProcessChannel(session)
    stats = train_site_parts(parts, data, task, settings, channel, cpu)
    assert stats.num_steps == session.steps == plain_stats.num_steps == 6
    assert session.mean_loss == pytest.approx(plain_stats.mean_loss, rel=1e-6)
    a, b = plain.state_dict(), split.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # per example: activations (4, 8, 8) float32 and an int64 label up; their gradient down
    assert channel.sent == 2 * 20 * (4 * 8 * 8 * 4 + 8) and channel.received == 2 * 20 * 4 * 8 * 8 * 4


def test_split_without_the_u_on_one_site_equals_training_the_unsplit_network(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medfed"):
        split, metrics = _real(tmp_path, "split", NO_U)
    assert "every training batch's labels go to the server" in caplog.text  # never silently
    plain, plain_metrics = _real(tmp_path, "plain")
    assert _close(split, plain)
    u_shaped, _ = _real(tmp_path, "u", {"kind": "split", "cut": "features.0"})
    assert _close(split, u_shaped)

    def rows(recs, metric, split_name):
        return [(r["round"], r["site"], r["value"]) for r in recs if r["metric"] == metric
                and r["split"] == split_name and r["arm"] == "federated"]

    # the training loss the server computed is the site's own unsplit loss; evaluation is the same path
    assert [v for *_, v in rows(metrics, "loss", "train")] == pytest.approx(
        [v for *_, v in rows(plain_metrics, "loss", "train")], rel=1e-6)
    for metric in ("auc", "accuracy"):
        assert [v for *_, v in rows(metrics, metric, "test")] == pytest.approx(
            [v for *_, v in rows(plain_metrics, metric, "test")], abs=1e-6)
    # bytes per round: 2 batches of 8; activations (8, 4, 8, 8) float32 and 8 int64 labels up, gradients down
    site_part = 4 * 9 * 4 + 4 * 4 * 4 + 8  # conv, norm (4 vectors + a step count); the head is the server's
    sent = [r["value"] for r in metrics if r["metric"] == "bytes_sent" and r["site"] == "s0"]
    received = [r["value"] for r in metrics if r["metric"] == "bytes_received" and r["site"] == "s0"]
    assert sent == [2 * 8 * (4 * 8 * 8 * 4 + 8) + site_part] * 2
    assert received == [2 * 8 * 4 * 8 * 8 * 4 + site_part] * 2


@pytest.mark.parametrize("parallel,baseline", [(False, {"kind": "cyclic"}), (True, None)],
                         ids=["sequential-is-cyclic", "splitfed-is-fedavg"])
def test_split_without_the_u_on_sites_is_its_unsplit_counterpart(tmp_path, parallel, baseline):
    split, metrics = _real(tmp_path, "split", {**NO_U, "cut": "features.1", "parallel": parallel}, sites=3)
    other, _ = _real(tmp_path, "other", baseline, sites=3)
    assert _close(split, other)
    assert {r["site"] for r in metrics if r["metric"] == "bytes_sent"} == {"s0", "s1", "s2"}


def test_splitfed_without_the_u_run_at_once_gives_what_it_gives_one_after_another(tmp_path, monkeypatch):
    assert_threaded_equals_sequential(tmp_path, monkeypatch, {**NO_U, "parallel": True})


def test_head_with_u_shaped_false_is_refused_naming_both_fields():
    with pytest.raises(ConfigError) as e:
        parse_job({**copy.deepcopy(JOB), "topology": {**NO_U, "head": "head"}})
    assert "topology.head" in str(e.value) and "topology.u_shaped" in str(e.value)
    job = parse_job({**copy.deepcopy(JOB), "topology": NO_U})
    assert "not U-shaped: the labels go to the server" in job.topology.label


def test_with_scarce_labels_only_the_labeled_examples_train_as_in_the_local_step(tmp_path):
    """Without a semi_supervised section a site leaves its unlabeled examples out of its
    training split (data/labels.py): none of their placeholder labels reaches the server."""
    from medfed.config.data import SyntheticData

    if "labeled_fraction" not in SyntheticData.model_fields:
        pytest.skip("data.labeled_fraction is not part of this tree")
    data = {"source": "synthetic", "image_size": 16, "labeled_fraction": 0.3, "sites": [
        {"name": "s0", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5}]}
    split, metrics = _real(tmp_path, "split", NO_U, data=data)
    plain, _ = _real(tmp_path, "plain", data=data)
    everything, _ = _real(tmp_path, "all", NO_U)
    assert _close(split, plain) and not _close(split, everything)
    labels_sent = [r["value"] for r in metrics if r["metric"] == "bytes_sent" and r["site"] == "s0"]
    assert labels_sent[0] < 2 * 8 * (4 * 8 * 8 * 4 + 8)  # fewer than the 16 examples crossed


def test_a_batch_with_an_unlabeled_example_is_refused_at_the_site():
    class Unlabeled(ArraySplit):
        def batches(self, *args, **kwargs):
            for b in super().batches(*args, **kwargs):
                yield type(b)(b.images, b.labels, b.spacings, b.skipped, torch.arange(len(b)) > 0)

    data = Unlabeled(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8,)))
    task = build_task(parse_job({**copy.deepcopy(JOB), "topology": {"kind": "server"}}))
    settings = TrainSettings(1, 8, 0.01, "sgd", 0.0, 0.0, 5)
    parts = cut_model(SmallCNN(1, 1, width=4), "features.0", u_shaped=False)
    session = MiddleSession(parts.middle, settings, torch.device("cpu"), task.loss)
    with pytest.raises(ModelError, match="topology.u_shaped: false sends each training example's label"):
        train_site_parts(parts, data, task, settings, InProcessChannel(session), torch.device("cpu"))
    assert session.steps == 0  # nothing reached the server


def test_validate_cuts_the_network_in_two():
    import medfed

    medfed.validate({**copy.deepcopy(JOB), "topology": {**NO_U, "cut": "pool"}})
    with pytest.raises(ConfigError, match="topology.cut: 'head' leaves nothing after it for the server"):
        medfed.validate({**copy.deepcopy(JOB), "topology": {**NO_U, "cut": "head"}})
