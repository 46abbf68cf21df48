"""Evaluation leaves the metrics of a model with non-finite outputs undefined."""

import logging

import torch
from torch import nn

from medfed.config import TaskConfig
from medfed.data.base import ArraySplit
from medfed.site.evaluate import evaluate_split
from medfed.tasks.classification import ClassificationTask

DATA = ArraySplit(torch.rand(20, 1, 4, 4), torch.tensor([0, 1] * 10))
TASK = ClassificationTask(TaskConfig(labels="binary"))


class Constant(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, x):
        return self.values[: len(x)].reshape(-1, 1)


def test_a_model_that_outputs_nan_gets_undefined_metrics(caplog):
    logits = torch.linspace(-2, 2, 20)
    logits[3] = float("nan")
    with caplog.at_level(logging.WARNING, logger="medfed"):
        metrics = evaluate_split(Constant(logits), DATA, TASK, torch.device("cpu"), where="site 'a', test split")
    assert set(metrics) == {"accuracy", "auc", "loss"} and all(v is None for v in metrics.values())
    assert "site 'a', test split: the model's outputs hold NaN or Inf for 1 of 20 examples" in caplog.text


def test_a_finite_model_gets_figures():
    metrics = evaluate_split(Constant(torch.linspace(-2, 2, 20)), DATA, TASK, torch.device("cpu"))
    assert metrics["accuracy"] == 0.5 and metrics["auc"] is not None and metrics["loss"] > 0


class Random(nn.Module):
    """Logits of ``k`` channels, spatial when ``spatial``: a model of any task."""

    def __init__(self, k: int, spatial: bool):
        super().__init__()
        self.k, self.spatial = k, spatial

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        shape = (len(x), self.k, *x.shape[2:]) if self.spatial else (len(x), self.k)
        return torch.randn(shape, generator=g)


def test_what_a_site_reports_is_what_the_server_accepts():
    """Every metric an honest evaluation gives, on val (no distances) and test, passes the
    server's check of evaluation answers (tasks.metric_bounds)."""
    from medfed.config import SegmentationTaskConfig
    from medfed.core.types import EvalResult, Split
    from medfed.server.validate import eval_problem
    from medfed.tasks import metric_bounds
    from medfed.tasks.segmentation import SegmentationTask

    labels3 = torch.tensor([0, 1, 2] * 6 + [0, 1])
    masks = (torch.rand(20, 8, 8) * 3).long()
    cases = [
        (TaskConfig(labels="binary"), ClassificationTask, DATA, 1, False),
        (TaskConfig(labels="multiclass", num_classes=3), ClassificationTask, ArraySplit(DATA.images, labels3), 3, False),
        (TaskConfig(labels="multilabel", num_classes=2), ClassificationTask,
         ArraySplit(DATA.images, torch.randint(0, 2, (20, 2)).float()), 2, False),
        (SegmentationTaskConfig(kind="segmentation", num_classes=3), SegmentationTask,
         ArraySplit(torch.rand(20, 1, 8, 8), masks), 3, True),
    ]
    for cfg, task_cls, data, k, spatial in cases:
        for split, distances in ((Split.VAL, False), (Split.TEST, True)):
            metrics = evaluate_split(Random(k, spatial), data, task_cls(cfg), torch.device("cpu"), distances=distances)
            result = EvalResult("a", split, len(data), metrics)
            assert eval_problem([result], metric_bounds(cfg), {split: len(data)}) is None, (cfg, split, metrics)
