"""task.loss: MONAI's segmentation losses by name, cross-entropy with class weights, the
user's own by import path; and the defaults unchanged (loss values and job hashes)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import medfed
from medfed.config import SEGMENTATION_LOSSES, SegmentationTaskConfig, TaskConfig
from medfed.core.errors import ConfigError
from medfed.tasks.classification import ClassificationTask
from medfed.tasks.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[2]


def _seg(loss="dice_ce", k=3) -> SegmentationTask:
    return SegmentationTask(SegmentationTaskConfig(kind="segmentation", num_classes=k, loss=loss))


def _cls(labels="multiclass", k=3, **kw) -> ClassificationTask:
    return ClassificationTask(TaskConfig(labels=labels, num_classes=2 if labels == "binary" else k, **kw))


def _seg_batch(k=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, k, 8, 8, generator=g), torch.randint(0, k, (4, 8, 8), generator=g)


@pytest.mark.parametrize("name", SEGMENTATION_LOSSES)
def test_each_segmentation_loss_trains(name):
    torch.manual_seed(0)
    task = _seg(name)
    masks = _seg_batch()[1]
    images = masks[:, None].float()
    model = nn.Conv2d(1, 3, 3, padding=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    values = []
    for _ in range(5):
        loss = task.loss(model(images), masks)
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    assert values[-1] < values[0]


def test_segmentation_losses_differ_and_default_is_dice_ce():
    logits, masks = _seg_batch()
    values = {n: float(_seg(n).loss(logits, masks)) for n in SEGMENTATION_LOSSES}
    assert len(set(values.values())) == len(values)
    from monai.losses import DiceCELoss

    today = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    default = SegmentationTask(SegmentationTaskConfig(kind="segmentation", num_classes=3))
    assert float(default.loss(logits, masks)) == float(today(logits, masks[:, None]))


def test_classification_default_unchanged():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    assert float(_cls().loss(logits, labels)) == float(nn.CrossEntropyLoss()(logits, labels))
    blogits, blabels = torch.randn(6, 1, generator=g), torch.randint(0, 2, (6,), generator=g)
    assert float(_cls("binary").loss(blogits, blabels)) == float(nn.BCEWithLogitsLoss()(blogits[:, 0], blabels.float()))
    mlogits, mlabels = torch.randn(6, 3, generator=g), torch.randint(0, 2, (6, 3), generator=g).float()
    assert float(_cls("multilabel").loss(mlogits, mlabels)) == float(nn.BCEWithLogitsLoss()(mlogits, mlabels))


@pytest.mark.parametrize("labels", ["binary", "multiclass", "multilabel"])
def test_class_weights_change_the_loss(labels):
    g = torch.Generator().manual_seed(2)
    k = 2 if labels == "binary" else 3
    logits = torch.randn(8, 1 if labels == "binary" else k, generator=g)
    target = (torch.randint(0, 2, (8, k), generator=g).float() if labels == "multilabel"
              else torch.tensor([0, 1] * 4) if labels == "binary" else torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    plain = float(_cls(labels, k).loss(logits, target))
    uniform = float(_cls(labels, k, class_weights=[2.0] * k).loss(logits, target))
    weighted = float(_cls(labels, k, class_weights=[1.0, 5.0, 0.5][:k]).loss(logits, target))
    assert weighted != pytest.approx(plain)
    if labels != "multilabel":  # a weighted mean: equal weights change nothing
        assert uniform == pytest.approx(plain)


def test_binary_weights_weight_each_example_by_its_class():
    logits, labels = torch.tensor([[0.3], [-1.0], [2.0]]), torch.tensor([1, 0, 1])
    per = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")
    w = torch.tensor([3.0, 1.0, 1.0])  # class 0 weighs 3
    expected = float((w[[1, 0, 1]] * per).sum() / w[[1, 0, 1]].sum())
    assert float(_cls("binary", class_weights=[3.0, 1.0]).loss(logits, labels)) == pytest.approx(expected)


def test_imported_loss(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent("""
        import torch

        def scaled(scale=1.0):
            return lambda logits, target: scale * torch.nn.functional.cross_entropy(logits, target)

        def seg_ce():  # segmentation masks arrive as (B, 1, *spatial), as MONAI's losses take them
            return lambda logits, target: torch.nn.functional.cross_entropy(logits, target[:, 0])

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    task = _cls(loss={"import": "my_losses:scaled", "args": {"scale": 3.0}})
    assert float(task.loss(logits, labels)) == pytest.approx(3 * float(nn.CrossEntropyLoss()(logits, labels)))
    seg = _seg({"import": "my_losses:seg_ce"})
    s_logits, masks = _seg_batch()
    assert float(seg.loss(s_logits, masks)) == pytest.approx(float(nn.CrossEntropyLoss()(s_logits, masks)))
    with pytest.raises(ConfigError, match="task.loss.import: no module named 'nope'"):
        _cls(loss={"import": "nope:fn"})
    with pytest.raises(ConfigError, match="task.loss.import: 'my_losses' has no attribute 'scaledd'; did you mean scaled"):
        _cls(loss={"import": "my_losses:scaledd"})
    with pytest.raises(ConfigError, match="not a class or function"):
        _cls(loss={"import": "my_losses:NOT_CALLABLE"})
    with pytest.raises(ConfigError, match="raised TypeError"):
        _cls(loss={"import": "my_losses:scaled", "args": {"bad": 1}})


def test_bad_loss_fields():
    with pytest.raises(ValueError, match="class_weights: one weight per class"):
        TaskConfig(labels="multiclass", num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="greater than 0"):
        TaskConfig(labels="binary", class_weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="dice_focal"):
        SegmentationTaskConfig(kind="segmentation", loss="dice_bce")
    with pytest.raises(ValueError, match="cross_entropy"):
        TaskConfig(labels="binary", loss="focal")


def test_job_hashes_unchanged_by_default_and_changed_by_a_choice():
    quick = medfed.load_job(ROOT / "src" / "medfed" / "examples" / "quickstart.yaml")
    seg = medfed.load_job(ROOT / "examples" / "segmentation.yaml")
    # the hashes these jobs had before task.loss existed
    assert quick.job_hash() == "378a4748ca0ade392266fb139084a24b1e6ed019e75cce656f5579c25b522d22"
    assert seg.job_hash() == "120eabdaac54f64b732782ad22aa1c9173f3705f0e562b6138cd0fcfcbb5cbbb"
    explicit = seg.model_copy(update={"task": seg.task.model_copy(update={"loss": "dice_ce"})})
    assert explicit.job_hash() == seg.job_hash()
    other = seg.model_copy(update={"task": seg.task.model_copy(update={"loss": "dice_focal"})})
    assert other.job_hash() != seg.job_hash()
    weighted = quick.model_copy(update={"task": quick.task.model_copy(update={"class_weights": [1.0, 2.0]})})
    assert weighted.job_hash() != quick.job_hash()


def test_a_run_with_a_chosen_loss(tmp_path):
    """One tiny round of a whole run with a non-default loss, from a job dict."""
    job = {"name": "loss", "output": str(tmp_path / "run"), "rounds": 1, "device": "cpu", "threads": 1,
           "data": {"source": "synthetic_segmentation", "image_size": 16,
                    "sites": [{"name": n, "n_train": 4, "n_val": 2, "n_test": 2} for n in ("a", "b")]},
           "model": {"name": "unet", "width": 4},
           "task": {"kind": "segmentation", "num_classes": 2, "loss": "tversky", "hd95": False, "save_predictions": 0},
           "algorithm": {"name": "fedavg"}, "train": {"local_epochs": 1, "batch_size": 4, "lr": 0.01}}
    result = medfed.run(job, progress=False)
    losses = [r["value"] for r in result.metrics if r["metric"] == "loss" and r["split"] == "val"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert "loss: tversky" in (result.run_dir / "job.yaml").read_text()


@pytest.mark.parametrize("task", [{"labels": "binary", "class_weights": [1.0, 3.0]},
                                  {"labels": "binary", "loss": {"import": "my_losses:scaled"}}])
def test_dp_sgd_refuses_a_loss_that_is_not_a_plain_mean(task):
    sites = [{"name": n, "n_train": 20, "n_test": 5} for n in ("a", "b")]
    raw = {"name": "t", "output": "out", "rounds": 2, "data": {"source": "synthetic", "sites": sites},
           "model": {"name": "small_cnn", "norm": "group"}, "task": task,
           "privacy": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}}}
    with pytest.raises(ConfigError, match="task.loss: DP-SGD needs the loss to be the plain batch mean"):
        medfed.validate(raw)
    medfed.validate({**raw, "task": {"labels": "binary"}})  # the default is fine


def test_a_missing_loss_module_stops_validate_and_run(tmp_path):
    job = {"name": "t", "output": str(tmp_path / "run"), "rounds": 1,
           "data": {"source": "synthetic", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]},
           "model": {"name": "small_cnn", "width": 4},
           "task": {"labels": "binary", "loss": {"import": "no_such_pkg.losses:mine"}}}
    for call in (medfed.validate, lambda j: medfed.run(j, progress=False)):
        with pytest.raises(ConfigError, match="task.loss.import: no module named 'no_such_pkg.losses'"):
            call(job)
    assert not (tmp_path / "run").exists()
