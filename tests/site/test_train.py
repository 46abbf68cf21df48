import torch

from medfed.algorithms.base import SiteHook
from medfed.config import ModelConfig, TaskConfig
from medfed.core.types import TrainSettings
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.evaluate import evaluate_split
from medfed.site.train import batches, train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.2
    x[y == 1, :, 6:10, 6:10] += 0.8  # a bright square marks the positives
    return ArraySplit(x, y)


def _settings(**kw):
    base = dict(local_epochs=3, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.0, seed=7)
    base.update(kw)
    return TrainSettings(**base)


def test_batches_cover_every_index_once_and_drop_single_tail():
    g = torch.Generator().manual_seed(0)
    got = torch.cat(list(batches(33, 8, g)))
    assert len(got) == 32 and len(set(got.tolist())) == 32  # the 33rd would be a batch of one
    assert sorted(torch.cat(list(batches(32, 8, torch.Generator().manual_seed(0)))).tolist()) == list(range(32))


def test_training_is_deterministic_and_learns():
    task, data = ClassificationTask(TASK), _data()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="small_cnn", width=8), TASK, 1)
        stats = train_local(model, data, task, _settings(), SiteHook(), torch.device("cpu"))
        results.append((get_params(model), stats))
    (p1, s1), (p2, s2) = results
    assert s1 == s2 and s1.num_steps == 12
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    metrics = evaluate_split(model, data, task, torch.device("cpu"))
    assert metrics["auc"] > 0.9


def test_hook_extra_loss_and_backward_are_called():
    calls = []

    class Probe(SiteHook):
        def extra_loss(self, model):
            calls.append("loss")
            return sum(p.sum() for p in model.parameters()) * 0.0

        def on_after_backward(self, model):
            calls.append("backward")

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)
    train_local(model, _data(32), ClassificationTask(TASK), _settings(local_epochs=1), Probe(), torch.device("cpu"))
    assert calls == ["loss", "backward"] * 2


def test_seeding_the_device_gives_the_draws_of_torch_manual_seed():
    from medfed.site.device import seed_device

    torch.manual_seed(7)
    expected = (torch.rand(5), torch.nn.functional.dropout(torch.ones(8), 0.5))
    torch.manual_seed(123)  # anything else in between
    seed_device(7, torch.device("cpu"))
    got = (torch.rand(5), torch.nn.functional.dropout(torch.ones(8), 0.5))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
