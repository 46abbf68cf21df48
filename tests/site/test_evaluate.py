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
