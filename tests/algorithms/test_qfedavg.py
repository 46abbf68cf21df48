"""q-FedAvg (q-FFL): the server rule against hand computations, q = 0, the site's loss
measured before training, and the job settings it refuses."""

import copy

import pytest
import torch

from medfed.algorithms import build_algorithm
from medfed.algorithms.base import SiteHook
from medfed.algorithms.qfedavg import LOSS_KEY, QFedAvg, QFedAvgHook
from medfed.config import ModelConfig, QFedAvgConfig, TaskConfig, parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, RoundPlan, TrainSettings, Update
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.site.evaluate import evaluate_split
from medfed.site.train import train_local
from medfed.tasks.classification import ClassificationTask

TRAIN = frozenset({"w", "b"})
X = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0]), "bn.running_mean": torch.tensor([0.0]),
     "bn.num_batches_tracked": torch.tensor(0)}


def _up(w, b, loss, n=10, buf=0.0, count=0, site="s"):
    params = {"w": torch.tensor(w), "b": torch.tensor(b), "bn.running_mean": torch.tensor([buf]),
              "bn.num_batches_tracked": torch.tensor(count)}
    return Update(site, 1, params, n, 3, extras={LOSS_KEY: torch.tensor([loss], dtype=torch.float64)})


# site 1 moved by d1 = x - w1 = (1, 0 | -1), site 2 by d2 = (0, 2 | 0); L = 2, so
# ||dw1||^2 = 4 * 2 = 8 and ||dw2||^2 = 4 * 4 = 16
UPS = [_up([0.0, 2.0], [1.0], 0.5, n=10, buf=2.0, count=3), _up([1.0, 0.0], [0.0], 2.0, n=30, buf=4.0, count=5)]


@pytest.mark.parametrize("q,expected_w,expected_b", [
    # q = 1: D1 = 0.5 * (2, 0 | -2), D2 = 2 * (0, 4 | 0); h1 = 1 * 8 + 2 * 0.5 = 9, h2 = 16 + 2 * 2 = 20
    (1.0, [1 - 1 / 29, 2 - 8 / 29], [1 / 29]),
    # q = 2: D1 = 0.25 * (2, 0 | -2), D2 = 4 * (0, 4 | 0); h1 = 2 * 0.5 * 8 + 2 * 0.25 = 8.5, h2 = 2 * 2 * 16 + 2 * 4 = 72
    (2.0, [1 - 0.5 / 80.5, 2 - 16 / 80.5], [0.5 / 80.5]),
])
def test_server_rule_hand_computed(q, expected_w, expected_b):
    out = QFedAvg(q, lipschitz=2.0, trainable=TRAIN).aggregate(X, UPS)
    assert torch.allclose(out["w"], torch.tensor(expected_w), atol=1e-6)
    assert torch.allclose(out["b"], torch.tensor(expected_b), atol=1e-6)
    # buffers: the unweighted mean (the example-weighted one would be 3.5 and 4.5 -> 4)
    assert float(out["bn.running_mean"]) == pytest.approx(3.0)
    assert int(out["bn.num_batches_tracked"]) == 4 and out["bn.num_batches_tracked"].dtype == torch.int64


def test_q_zero_is_the_unweighted_mean():
    g = torch.Generator().manual_seed(0)
    ups = [Update(f"s{i}", 1, {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
                  num_examples=n, num_steps=2, extras={LOSS_KEY: torch.tensor([loss], dtype=torch.float64)})
           for i, (n, loss) in enumerate([(10, 0.3), (200, 1.7), (35, 0.0)])]
    x = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    for lipschitz in (0.5, 20.0):  # whatever L and the losses, even a loss of 0
        out = QFedAvg(0.0, lipschitz, TRAIN).aggregate(x, ups)
        for k in ("w", "b"):
            mean = torch.stack([u.params[k] for u in ups]).mean(0)
            assert torch.allclose(out[k], mean, atol=1e-6), k


def test_large_q_does_not_overflow_and_the_worst_site_leads():
    ups = [_up([0.0, 2.0], [1.0], 10.0), _up([1.0, 0.0], [0.0], 1000.0)]  # 1000^200 overflows a float64
    out = QFedAvg(200.0, 2.0, TRAIN).aggregate(X, ups)
    alone = QFedAvg(200.0, 2.0, TRAIN).aggregate(X, ups[1:])
    assert all(bool(torch.isfinite(out[k]).all()) for k in ("w", "b"))
    assert torch.allclose(out["w"], alone["w"]) and torch.allclose(out["b"], alone["b"])


def test_updates_without_a_usable_loss_are_refused():
    rule = QFedAvg(1.0, 2.0, TRAIN)
    assert rule.update_problem(UPS[0], X) is None
    no_loss = Update("s", 1, UPS[0].params, 10, 3)
    assert "needs the site's loss before training" in rule.update_problem(no_loss, X)
    for bad in (float("nan"), float("inf"), -0.1):
        assert "must be a finite loss >= 0" in rule.update_problem(_up([0.0, 2.0], [1.0], bad), X)
    two = Update("s", 1, UPS[0].params, 10, 3, extras={LOSS_KEY: torch.tensor([0.5, 0.5])})
    assert "one floating-point value" in rule.update_problem(two, X)


def test_lipschitz_defaults_to_one_over_the_learning_rate():
    model = torch.nn.Linear(2, 1)
    assert build_algorithm(QFedAvgConfig(name="qfedavg", q=1.0), model, 3, lr=0.05).lipschitz == pytest.approx(20.0)
    assert build_algorithm(QFedAvgConfig(name="qfedavg", q=1.0, lipschitz=5.0), model, 3, lr=0.05).lipschitz == 5.0
    site_copy = build_algorithm(QFedAvgConfig(name="qfedavg"), model, 3)  # a site never aggregates
    with pytest.raises(ValueError, match="needs L"):
        site_copy.aggregate(X, UPS)
    with pytest.raises(ValueError, match="algorithm.q: must be >= 0"):
        QFedAvg(-1.0, 2.0, TRAIN)


TASK = TaskConfig(labels="binary")
SETTINGS = TrainSettings(1, 8, 0.1, "sgd", 0.9, 0.0, seed=3)
PLAN = RoundPlan("j", 1, Arm.FEDERATED, SETTINGS)


def _train(hook):
    g = torch.Generator().manual_seed(0)
    data = ArraySplit(torch.rand(24, 1, 16, 16, generator=g), torch.randint(0, 2, (24,), generator=g))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn", width=4), TASK, 1)
    before = evaluate_split(copy.deepcopy(model), data, ClassificationTask(TASK), torch.device("cpu"))["loss"]
    hook.on_train_start(model, PLAN)
    train_local(model, data, ClassificationTask(TASK), SETTINGS, hook, torch.device("cpu"))
    return get_params(model), hook.on_train_end(model, 3), before


def test_site_sends_the_loss_of_the_model_it_received_and_trains_as_fedavg():
    trained, extras, before = _train(QFedAvgHook())
    assert float(extras[LOSS_KEY]) == pytest.approx(before, rel=1e-5)  # the global model's, not the trained one's
    plain, nothing, _ = _train(SiteHook())
    assert nothing == {}  # other algorithms send nothing more and measure nothing
    assert all(torch.equal(trained[k], plain[k]) for k in plain)  # measuring first changes nothing of training


BASE = {
    "name": "t", "output": "out", "rounds": 2,
    "data": {"source": "synthetic", "sites": [{"name": n, "n_train": 20, "n_test": 5} for n in "abcde"]},
    "model": {"name": "small_cnn", "norm": "group"}, "task": {"labels": "binary"},
    "algorithm": {"name": "qfedavg", "q": 1.0},
}
DP = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
SGD = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


def _job(**over):
    raw = copy.deepcopy(BASE)
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if k == "algorithm" else v
    return parse_job(raw, "job.yaml")


def test_settings_load():
    job = _job(algorithm={"q": 0, "lipschitz": 10})
    assert job.algorithm.q == 0 and job.algorithm.lipschitz == 10
    assert _job(compression={"method": "int8"}).algorithm.q == 1.0  # compressed updates are decoded first


@pytest.mark.parametrize("over,expected", [
    ({"algorithm": {"q": -1}}, "algorithm.q: must be >= 0, got -1"),
    ({"algorithm": {"q": ".nan"}}, "algorithm.q"),
    ({"algorithm": {"lipschitz": 0}}, "algorithm.lipschitz: must be > 0, got 0"),
    ({"privacy": {"secure_aggregation": {}}},
     "secure aggregation reveals only the sum of the updates; 'qfedavg' weights each site's update by its own training loss"),
    ({"robust": {"rule": "median"}}, "robust: replaces the weighted mean, but 'qfedavg' weights each site's update"),
    ({"privacy": {"dp": DP}}, "site-level DP bounds each site's share of the mean of the updates; 'qfedavg'"),
    ({"privacy": {"dp_sgd": SGD}}, "'qfedavg' weights each update by the site's training loss, which DP-SGD does not privatize"),
])
def test_refused_settings_name_the_field(over, expected):
    with pytest.raises(ConfigError) as e:
        _job(**over)
    assert expected in str(e.value)
