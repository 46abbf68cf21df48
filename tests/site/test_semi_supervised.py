"""Semi-supervised local training (site/semi.py, config/semi.py): the mean teacher is the
moving average of the student, FixMatch learns from confident pseudo-labels only, a site
without labels trains, the teacher is site state that a resumed run takes up, and what
cannot run is refused at load time naming the field."""

from __future__ import annotations

import copy

import pytest
import torch

from medfed.algorithms.base import SiteHook
from medfed.config import ModelConfig, SemiConfig, TaskConfig, parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, RoundPlan, TrainSettings
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.semi import Composed, FixMatch, MeanTeacher, class_log_probs
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")
CPU = torch.device("cpu")


def _data(n=48, labeled=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.2
    x[y == 1, :, 6:10, 6:10] += 0.8
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:labeled] = True
    return ArraySplit(x, torch.where(mask, y, 0), labeled=None if labeled == n else mask)


def _settings(**kw):
    base = dict(local_epochs=2, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.0, weight_decay=0.0, seed=7)
    return TrainSettings(**{**base, **kw})


def _plan(rnd=1):
    return RoundPlan(job_id="j", round=rnd, arm=Arm.FEDERATED, train=_settings())


def _model(norm="batch"):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="small_cnn", width=4, norm=norm), TASK, 1)


def _train(model, data, hook, **kw):
    hook.on_train_start(model, _plan())
    return train_local(model, data, ClassificationTask(TASK), _settings(**kw), hook, CPU)


def test_the_teacher_is_the_moving_average_of_the_student():
    cfg = SemiConfig(method="mean_teacher", ema=0.8)
    seen = []

    class Recording(MeanTeacher):
        def on_step_end(self, model):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            super().on_step_end(model)

    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    hook = Recording(cfg, sigmoid=True, dims=2, segmentation=False)
    stats = _train(model, _data(), hook)
    assert stats.num_steps == len(seen) == 6
    expected = {k: v.float() for k, v in start.items()}
    for student in seen:
        expected = {k: 0.8 * expected[k] + 0.2 * student[k].float() for k in expected}
    for k, v in hook.teacher.items():
        if v.is_floating_point():
            assert torch.allclose(v, expected[k], atol=1e-6), k
        else:
            assert torch.equal(v, seen[-1][k])
    assert any(not torch.equal(hook.teacher[k], seen[-1][k]) for k in hook.teacher if hook.teacher[k].is_floating_point())


def test_fixmatch_with_no_confident_pseudo_label_is_the_supervised_loss_only():
    data = _data()
    plain, fixmatch = _model("group"), _model("group")
    strict = FixMatch(SemiConfig(method="fixmatch", threshold=0.999), sigmoid=True, dims=2, segmentation=False)
    s1 = _train(plain, data, SiteHook())
    s2 = _train(fixmatch, data, strict)
    p1, p2 = get_params(plain), get_params(fixmatch)
    assert s1 == s2 and all(torch.equal(p1[k], p2[k]) for k in p1)
    # a threshold the model reaches adds the pseudo-label term: another model
    loose = FixMatch(SemiConfig(method="fixmatch", threshold=0.5), sigmoid=True, dims=2, segmentation=False)
    other = _model("group")
    _train(other, data, loose)
    p3 = get_params(other)
    assert any(not torch.equal(p1[k], p3[k]) for k in p1)


def test_fixmatch_term_counts_only_confident_pseudo_labels():
    hook = FixMatch(SemiConfig(method="fixmatch", threshold=0.9), sigmoid=False, dims=2, segmentation=False)
    hook.on_train_start(torch.nn.Identity(), _plan())

    class Fixed(torch.nn.Module):  # a classifier whose outputs do not depend on the view
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 5.0]]))

        def forward(self, x):
            return self.logits[: len(x)] * 1.0

    model = Fixed()
    images = torch.rand(3, 1, 8, 8)
    term = hook.batch_loss(model, images, model(images), torch.zeros(3, dtype=torch.bool))
    logp = torch.log_softmax(model.logits.detach(), 1)
    # rows 0 and 2 are confident (p >= 0.9) and count; row 1 (p = 0.55) does not; the mean is over all 3
    assert term is not None and torch.isclose(term, -(logp[0, 0] + logp[2, 1]) / 3)
    assert hook.batch_loss(model, images, model(images), torch.ones(3, dtype=torch.bool)) is None  # all labeled


def test_a_site_without_labels_trains_through_the_consistency_term():
    data = _data(labeled=0)
    model = _model()
    before = get_params(model)
    stats = _train(model, data, MeanTeacher(SemiConfig(method="mean_teacher"), True, 2, False))
    after = get_params(model)
    assert stats.num_steps == 6 and any(not torch.equal(before[k], after[k]) for k in before)
    # without a semi-supervised hook it has nothing to learn from: no step at all
    plain = _model()
    assert _train(plain, data, SiteHook()).num_steps == 0


def test_probabilities_of_sigmoid_outputs_are_two_classes():
    z = torch.tensor([[0.0], [2.0]])
    p = class_log_probs(z, True).exp()
    assert p.shape == (2, 2) and torch.allclose(p.sum(1), torch.ones(2))
    assert torch.isclose(p[1, 1], torch.sigmoid(torch.tensor(2.0)))
    assert class_log_probs(torch.zeros(2, 3, 4), True).shape == (2, 2, 3, 4)  # multi-label: (B, 2, K)


def test_composed_hook_keeps_the_algorithms_parts_and_both_states():
    class Algo(SiteHook):
        state_fields = ("c",)

        def __init__(self):
            self.c, self.calls = None, []

        def extra_loss(self, model):
            self.calls.append("extra")
            return None

        def on_after_backward(self, model):
            self.calls.append("backward")

    algo = Algo()
    algo.c = {"w": torch.ones(2)}
    semi = MeanTeacher(SemiConfig(method="mean_teacher"), True, 2, False)
    hook = Composed(algo, semi)
    model = _model()
    _train(model, _data(), hook)
    assert algo.calls.count("extra") == algo.calls.count("backward") == 6
    state = hook.state()
    assert torch.equal(state["algorithm/c/w"], torch.ones(2))
    assert {k for k in state if k.startswith("semi/teacher/")} == {f"semi/teacher/{k}" for k in model.state_dict()}
    fresh = Composed(Algo(), MeanTeacher(SemiConfig(method="mean_teacher"), True, 2, False))
    fresh.load_state(state)
    assert torch.equal(fresh.algorithm.c["w"], torch.ones(2))
    assert all(torch.equal(fresh.semi.teacher[k], semi.teacher[k].cpu()) for k in semi.teacher)
    with pytest.raises(ValueError, match="unexpected entry 'other/x'"):
        fresh.load_state({"other/x": torch.ones(1)})


# --------------------------------------------------------------------------- whole runs

RUN = {
    "name": "semi", "rounds": 2, "threads": 1, "seed": 1,
    "data": {"source": "synthetic", "image_size": 16, "labeled_fraction": 0.3,
             "sites": [{"name": "a", "n_train": 24, "n_val": 8, "n_test": 8},
                       {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8, "unlabeled": True}]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05, "momentum": 0.0},
    "semi_supervised": {"method": "mean_teacher", "rampup_rounds": 2},
}


def test_a_short_run_end_to_end(tmp_path):
    import json

    from medfed.server.runner import run_job

    job = parse_job({**copy.deepcopy(RUN), "output": str(tmp_path / "run"), "algorithm": {"name": "fedprox", "mu": 0.1}})
    result = run_job(job)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    test_auc = {r["site"] for r in records if r.get("metric") == "auc" and r.get("split") == "test"}
    assert "a" in test_auc and "b" not in test_auc  # b has no labeled test examples: no figure, not NaN
    sites = json.loads((result.run_dir / "sites.json").read_text())["sites"]
    assert [(s["name"], s["train"], s.get("unlabeled", 0)) for s in sites] == [("a", 24, 17), ("b", 16, 16)]
    assert "24 (17 unlabeled)" in (result.run_dir / "report.html").read_text()


@pytest.mark.parametrize("method", ["mean_teacher", "fixmatch"])
def test_stopped_then_resumed_equals_the_run_never_stopped(method, tmp_path, monkeypatch):
    """The teacher is site state: a run stopped while the sites train round 2 and resumed
    ends as the run never stopped, bit for bit."""
    import server.test_resume_simulation as stopped
    from server.test_resume_simulation import _same_run, _stop_while_training, _stopped_then_resumed

    from medfed.server.runner import run_job

    over = {"semi_supervised": {"method": method, **({"threshold": 0.6} if method == "fixmatch" else {})},
            "rounds": 3}
    raw = {**copy.deepcopy(RUN), **over}
    whole = run_job(parse_job({**raw, "output": str(tmp_path / "whole")})).run_dir
    monkeypatch.setattr(stopped, "RAW", raw)
    resumed = _stopped_then_resumed(tmp_path, monkeypatch, {}, lambda m: _stop_while_training(m, 2, "b"))
    _same_run(whole, resumed)


def _refusal(change) -> str:
    raw = copy.deepcopy({**RUN, "output": "out"})
    change(raw)
    with pytest.raises(ConfigError) as e:
        parse_job(raw, "job.yaml")
    return str(e.value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["data"]["sites"][0].update(unlabeled=True),
     "semi_supervised: no training site has a single label"),
    (lambda d: d["data"].update(labeled_fraction=0), "data.labeled_fraction: must be > 0"),
    (lambda d: d["data"]["sites"][0].update(labeled_fraction=1.5), "data.sites[0].labeled_fraction: must be <= 1"),
    (lambda d: d["data"]["sites"][1].update(labeled_fraction=0.5), "labeled_fraction: a site with unlabeled: true"),
    (lambda d: d["semi_supervised"].update(method="fixmatch", threshold=1), "semi_supervised.threshold: must be < 1"),
    (lambda d: d["semi_supervised"].update(method="fixmatch", threshold=0), "semi_supervised.threshold: must be > 0"),
    (lambda d: d["semi_supervised"].update(threshold=0.9), "threshold: is FixMatch's confidence"),
    (lambda d: d["semi_supervised"].update(method="fixmatch", ema=0.9), "ema: is the mean teacher's"),
    (lambda d: d["semi_supervised"].update(method="simclr"), "semi_supervised.method"),
    (lambda d: d.pop("semi_supervised"), "data.sites[1].unlabeled: site 'b' has no labels"),
    (lambda d: d.update(privacy={"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}},
                        model={"name": "small_cnn", "width": 4, "norm": "group"}), "privacy.dp_sgd: the semi-supervised"),
    (lambda d: (d.pop("semi_supervised"), d.update(task={"kind": "reconstruction"}, model={"name": "unet"},
                data={"source": "pairs", "mask_values": [0, 255], "labeled_fraction": 0.5,
                      "sites": [{"name": "a", "images": "i", "masks": "m"}]})),
     "data.labeled_fraction: a reconstruction's targets are its images"),
    (lambda d: d.update(algorithm={"name": "harmofl"}), "algorithm.name: harmofl's sharpness-aware second pass"),
    (lambda d: d.update(topology={"kind": "split", "cut": "features.0"}), "but topology.kind: split sends"),
    (lambda d: d.update(task={"kind": "reconstruction"}, model={"name": "unet"},
                        data={"source": "synthetic_phantoms", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}),
     "semi_supervised: is for classification and 2D segmentation, not task.kind 'reconstruction'"),
    (lambda d: d.update(task={"kind": "segmentation", "num_classes": 2}, model={"name": "unet"},
                        data={"source": "synthetic_segmentation", "dims": 3, "image_size": 16,
                              "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}),
     "semi_supervised: segmentation is supported in 2D only"),
    (lambda d: d.update(task={"kind": "segmentation", "num_classes": 2}, model={"name": "unet"},
                        data={"source": "synthetic_segmentation", "image_size": 16,
                              "sites": [{"name": "a", "n_train": 4, "n_test": 2}]},
                        semi_supervised={"method": "fixmatch", "strong": [{"name": "rotate"}]}),
     "semi_supervised.strong[0]: rotate moves pixels"),
])
def test_refusals_name_the_field(change, message):
    assert message in _refusal(change)


def test_a_job_without_the_section_keeps_its_hash():
    raw = {k: v for k, v in copy.deepcopy(RUN).items() if k != "semi_supervised"}
    raw["data"] = {**raw["data"], "sites": [raw["data"]["sites"][0]]}
    raw["data"].pop("labeled_fraction")
    job = parse_job({**raw, "output": "o"})
    dumped = job.model_dump(mode="json")
    assert "semi_supervised" not in dumped and "labeled_fraction" not in dumped["data"]
    assert "unlabeled" not in dumped["data"]["sites"][0]
