import pytest
import torch

from medfed.config import TaskConfig
from medfed.tasks.classification import ClassificationTask


def test_binary_metrics_hand_computed():
    task = ClassificationTask(TaskConfig(labels="binary"))
    probs = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    m = task.metrics(probs, labels)
    # pairs (pos, neg): (0.35>0.1), (0.35<0.4), (0.8>0.1), (0.8>0.4) -> 3/4
    assert m["auc"] == pytest.approx(0.75)
    # thresholded at 0.5: [0, 0, 0, 1] vs [0, 0, 1, 1] -> 3/4
    assert m["accuracy"] == pytest.approx(0.75)


def test_auc_undefined_with_one_class_is_none():
    task = ClassificationTask(TaskConfig(labels="binary"))
    m = task.metrics(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]))
    assert m["auc"] is None and m["accuracy"] == pytest.approx(0.5)


def test_multiclass_per_class_and_macro_auc():
    task = ClassificationTask(TaskConfig(labels="multiclass", num_classes=3))
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 2, 1])
    m = task.metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(3 / 4)
    # class 0: pos score 0.8 vs negs 0.2, 0.3, 0.5 -> 1.0
    # class 1: pos 0.7, 0.4 vs negs 0.1, 0.3 -> 4/4 = 1.0
    # class 2: pos 0.4 vs 0.1, 0.1, 0.1 -> 1.0
    assert m["auc_class_0"] == pytest.approx(1.0)
    assert m["auc_class_1"] == pytest.approx(1.0)
    assert m["auc_class_2"] == pytest.approx(1.0)
    probs[3] = torch.tensor([0.5, 0.2, 0.3])  # class 1 positive now scored below a negative
    m = task.metrics(probs, labels)
    # class 1: pos 0.7 > 0.1, 0.3; pos 0.2 > 0.1, < 0.3 -> 3/4
    assert m["auc_class_1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx((m["auc_class_0"] + 0.75 + m["auc_class_2"]) / 3)


def test_multilabel_macro_skips_undefined_labels():
    task = ClassificationTask(TaskConfig(labels="multilabel", num_classes=2))
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.6], [0.7, 0.4]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # label 1 never positive
    m = task.metrics(probs, labels)
    assert m["auc_class_0"] == pytest.approx(1.0) and m["auc_class_1"] is None
    assert m["auc"] == pytest.approx(1.0)
    # per-label accuracy at 0.5: label0 3/3, label1 2/3 -> mean 5/6
    assert m["accuracy"] == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "labels,k,y",
    [("binary", 2, torch.tensor([0, 1])), ("multiclass", 3, torch.tensor([0, 2])),
     ("multilabel", 3, torch.tensor([[1.0, 0, 1], [0, 0, 1]]))],
)
def test_loss_is_finite_and_positive(labels, k, y):
    task = ClassificationTask(TaskConfig(labels=labels, num_classes=k))
    logits = torch.zeros(2, 1 if labels == "binary" else k)
    loss = task.loss(logits, y)
    assert torch.isfinite(loss) and loss > 0


def test_auc_equals_monais_with_ties_and_is_none_for_nan_scores():
    """The rank statistic medfed computes (without importing MONAI) is MONAI's
    compute_roc_auc, ties included, bit for bit."""
    from monai.metrics import compute_roc_auc

    from medfed.tasks.classification import _auc

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(2, 300, (1,), generator=g))
        y = torch.randint(0, 2, (n,), generator=g)
        y[0], y[1] = 0, 1
        s = torch.rand(n, generator=g)
        if trial % 2:
            s = (s * 4).round() / 4  # many ties
        assert _auc(s, y) == float(compute_roc_auc(s, y))
    assert _auc(torch.tensor([0.1, 0.9, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.875  # one tie: half
    assert _auc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])) is None
