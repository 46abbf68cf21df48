"""FedCE: the server's coefficients computed by hand, the site's others'-model score and
estimate, the checks on what a site sends, the state across a restart, and a real run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import medfed
from medfed.algorithms.fedce import COEF_KEY, MINUS_KEY, FedCE, FedCEHook, minus_model
from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, RoundPlan, TrainSettings, Update


def _update(site, w, minus=1.0, n=10):
    return Update(site, 1, {"w": torch.tensor(w, dtype=torch.float32)}, n, 1, {},
                  {MINUS_KEY: torch.tensor([minus], dtype=torch.float64)})


def test_first_round_coefficients_by_hand():
    rule = FedCE("times", trainable=frozenset({"w"}))
    out = rule.aggregate({"w": torch.zeros(2)}, [_update("a", [1, 0]), _update("b", [1, 0]), _update("c", [0, 1])])
    # c = 1/3 each; consensus (2/3, 1/3); a's others (1/3, 1/3): cos 1/sqrt(2); c's others (2/3, 0): cos 0
    g = [1 - 1 / math.sqrt(2)] * 2 + [1.0]
    w = [x / sum(g) for x in g]  # the data estimates are equal: times keeps these
    assert [float(rule.coef[s]) for s in "abc"] == pytest.approx(w)
    assert out["w"].tolist() == pytest.approx([w[0] + w[1], w[2]], rel=1e-6)
    assert rule.site_extras("c")[COEF_KEY].item() == pytest.approx(w[2])
    assert rule.site_extras("z") == {}


def test_plus_mode_and_the_data_estimate_weigh_in():
    times, plus = FedCE("times", frozenset({"w"})), FedCE("plus", frozenset({"w"}))
    ups = [_update("a", [1, 0], minus=1.0), _update("b", [0, 1], minus=3.0)]
    for rule in (times, plus):
        rule.aggregate({"w": torch.zeros(2)}, ups)
    # same gradient estimate (both orthogonal to the other); data 1/4 and 3/4
    assert float(times.coef["b"]) == pytest.approx(0.75)
    assert float(plus.coef["b"]) == pytest.approx((0.5 + 0.75) / 2)


def test_a_weight_is_never_below_the_floor():
    rule = FedCE("times", frozenset({"w"}))
    rule.aggregate({"w": torch.zeros(2)}, [_update("a", [1, 0], minus=0.0), _update("b", [0, 1], minus=1.0)])
    assert float(rule.coef["a"]) >= 1e-3 * 0.999 and sum(float(c) for c in rule.coef.values()) == pytest.approx(1.0)


def _plan(coef=None):
    extras = {} if coef is None else {COEF_KEY: torch.tensor([coef], dtype=torch.float64)}
    return RoundPlan("j", 2, Arm.FEDERATED, TrainSettings(1, 8, 0.1, "sgd", 0.0, 0.0, 1), extras)


def test_the_site_scores_the_others_model_and_sends_one_minus_the_mean():
    hook = FedCEHook()
    assert hook.probe({"w": torch.ones(2)}, _plan()) is None  # first round: nothing sent yet
    model = torch.nn.Linear(2, 1)
    sent = hook.on_train_end(model, 3)
    assert sent[MINUS_KEY].item() == pytest.approx(1.0)  # 1 - mean([0])
    glob = {k: v + 1 for k, v in hook.last.items()}
    probe = hook.probe(glob, _plan(0.25))
    for k in glob:
        assert torch.allclose(probe[k], (glob[k] - 0.25 * hook.last[k]) / 0.75)
    hook.on_probe(0.8)
    assert hook.on_train_end(model, 3)[MINUS_KEY].item() == pytest.approx(1.0 - 0.4)  # 1 - mean([0, 0.8])
    with pytest.raises(ValueError, match="must be one value in \\[0, 1\\)"):
        hook.probe(glob, _plan(1.0))
    assert minus_model({"n": torch.tensor(3)}, {"n": torch.tensor(1)}, 0.5)["n"].item() == 3  # counters kept


def test_what_the_server_refuses_and_its_state_across_a_restart():
    rule = FedCE("times", frozenset({"w"}))
    bad = _update("a", [1, 0])
    bad.extras.clear()
    assert "needs the site's data-space estimate" in rule.update_problem(bad, {})
    assert "must be one minus a mean metric" in rule.update_problem(_update("a", [1, 0], minus=float("nan")), {})
    ups = [_update("a", [1, 0]), _update("b", [1, 0]), _update("c", [0, 1])]
    rule.aggregate({"w": torch.zeros(2)}, ups)
    again = FedCE("times", frozenset({"w"}))
    again.load_server_state(rule.server_state())
    assert torch.equal(again.aggregate({"w": torch.zeros(2)}, ups)["w"], rule.aggregate({"w": torch.zeros(2)}, ups)["w"])


BASE = {"name": "ce", "seed": 1, "output": "out", "rounds": 3, "threads": 1, "device": "cpu",
        "data": {"source": "synthetic", "image_size": 16, "sites": [
            {"name": f"s{i}", "n_train": 24, "n_val": 12, "n_test": 8, "prevalence": 0.5} for i in range(3)]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
        "train": {"batch_size": 8, "lr": 0.05}, "algorithm": {"name": "fedce"}}


@pytest.mark.parametrize("extra,expected", [
    ({"sampling": {"count": 2}}, "sampling: fedce compares every site with all the others"),
    ({"robust": {"rule": "median"}}, "robust"),
    ({"algorithm": {"name": "fedce", "mode": "sum"}}, "algorithm.mode"),
])
def test_bad_fedce_jobs(extra, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_job({**copy.deepcopy(BASE), **extra})


def test_a_fedce_run_weights_the_sites_and_finishes(tmp_path, monkeypatch):
    seen = []
    original = FedCE.aggregate

    def spy(self, global_params, updates):
        out = original(self, global_params, updates)
        seen.append({s: float(c) for s, c in self.coef.items()})
        return out

    monkeypatch.setattr(FedCE, "aggregate", spy)
    result = medfed.run({**copy.deepcopy(BASE), "output": str(tmp_path / "run")}, progress=False)
    assert len(seen) == 3 and all(sum(c.values()) == pytest.approx(1.0) for c in seen)
    assert any(abs(c - 1 / 3) > 1e-6 for c in seen[-1].values())  # not the plain mean
    auc = [r for r in result.metrics if r["metric"] == "auc" and r["site"] == "all" and r["arm"] == "federated"]
    assert auc and all(0.0 <= r["value"] <= 1.0 for r in auc)
