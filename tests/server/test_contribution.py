"""Per-site contribution (the job's ``contribution`` section): the Shapley estimators on
games whose answer is known, then whole runs where it must show: a site whose labels are
random contributes nothing or harms, a duplicated site gets its twin's value (symmetry),
and the values add up to the gain of all updates over none (efficiency); and the jobs it
cannot go with, refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import medfed
from medfed.config import Job, parse_job
from medfed.core.errors import ConfigError, RunDirError
from medfed.core.types import EvalResult, SiteFailure, Update
from medfed.server.contribution import ContributionTracker, subset_model
from medfed.server.shapley import Memo, exact_shapley, leave_one_out, sampled_shapley
from medfed.tracking.contribution import read_contribution
from medfed.transport.base import Transport

# --------------------------------------------------------------------------- the estimators

WEIGHTS = (0.5, -0.2, 0.0, 1.5, 0.3, 0.3, 0.8, -0.4)  # 8 players: the sampled estimator's range


def _additive(weights):
    return lambda s: 2.0 + sum(weights[i] for i in s)


def _square(weights):
    """U(S) = (sum of S's weights)^2, whose Shapley values are w_i * (sum of all weights)."""
    return lambda s: sum(weights[i] for i in s) ** 2


def test_exact_shapley_of_an_additive_game_is_each_players_own_worth():
    n = 5
    est = exact_shapley(n, _additive(WEIGHTS))
    assert est.values == pytest.approx(WEIGHTS[:n], abs=1e-12)
    assert est.halfwidths is None and est.evaluations == 2**n
    assert leave_one_out(n, _additive(WEIGHTS)) == pytest.approx(WEIGHTS[:n], abs=1e-12)


def test_exact_shapley_is_symmetric_gives_null_players_nothing_and_adds_up():
    n, w = 6, WEIGHTS[:6]  # players 4 and 5 have the same weight; player 2 none
    est = exact_shapley(n, _square(w))
    assert est.values == pytest.approx([wi * sum(w) for wi in w], abs=1e-12)
    assert est.values[4] == est.values[5]
    assert est.values[2] == 0.0
    assert sum(est.values) == pytest.approx(_square(w)(frozenset(range(n))) - _square(w)(frozenset()), abs=1e-12)


def test_sampled_shapley_finds_the_values_within_its_interval_and_adds_up():
    n, w = len(WEIGHTS), WEIGHTS
    u = Memo(_square(w))
    est = sampled_shapley(n, u, 400, np.random.default_rng(0))
    truth = [wi * sum(w) for wi in w]
    assert est.halfwidths is not None and all(h >= 0 for h in est.halfwidths)
    # 95% intervals: with 8 players, seeded, each value lies within twice its half-width
    for value, h, t in zip(est.values, est.halfwidths, truth):
        assert abs(value - t) <= 2 * h + 1e-12
    # every order's gains telescope to U(N) - U(empty): efficiency holds whatever the sampling error
    assert sum(est.values) == pytest.approx(u(frozenset(range(n))) - u(frozenset()), abs=1e-9)
    assert est.evaluations == len(u) < 2**n
    again = sampled_shapley(n, _square(w), 400, np.random.default_rng(0))
    assert again.values == est.values  # seeded: the same orders, the same estimate


def test_truncation_stops_an_order_once_the_gain_is_reached():
    n, w = 8, (1.0, 0, 0, 0, 0, 0, 0, 0)  # one player makes all the gain
    full = sampled_shapley(n, _additive(w), 50, np.random.default_rng(1), truncation=0.0)
    cut = sampled_shapley(n, _additive(w), 50, np.random.default_rng(1), truncation=1e-6)
    assert cut.values == pytest.approx(full.values) and cut.values[0] == pytest.approx(1.0)
    assert cut.evaluations < full.evaluations
    with pytest.raises(ValueError, match="at least 2 samples"):
        sampled_shapley(n, _additive(w), 1, np.random.default_rng(1))


# --------------------------------------------------------------------------- whole runs


def _ds(n: int, seed: int, random_labels: bool = False) -> TensorDataset:
    """Class 1 has a bright square; with ``random_labels`` the labels ignore it."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long()
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    x[:, :, 2:6, 2:6] += y.view(-1, 1, 1, 1) * 0.6
    if random_labels:
        y = (torch.rand(n, generator=g) < 0.5).long()
    return TensorDataset(x, y)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _site(seed: int, random_labels: bool = False) -> dict:
    return {"train": _ds(16, seed, random_labels), "val": _ds(12, seed + 1), "test": _ds(8, seed + 2)}


def _datasets(extra: int = 0) -> dict:
    a = _site(1)
    sites = {"a": a, "a_twin": a, "b": _site(4), "noisy": _site(7, random_labels=True)}
    sites.update({f"c{i}": _site(10 + 3 * i) for i in range(extra)})
    return sites


def _job(tmp_path: Path, name: str = "run", **extra) -> dict:
    # one full batch a local epoch: the twins' updates are the same whatever the order of their examples
    return {"name": "contribution", "output": str(tmp_path / name), "rounds": 2, "device": "cpu", "threads": 1,
            "task": {"kind": "classification", "labels": "binary", "num_classes": 2, "monitor": "auc"},
            "train": {"local_epochs": 3, "batch_size": 16, "lr": 1.0, "momentum": 0.0}, **extra}


def test_shapley_of_a_run_random_labels_twins_and_efficiency(tmp_path):
    job = _job(tmp_path, contribution={"method": "shapley", "metric": "loss"})
    result = medfed.run(job, datasets=_datasets(), model=TinyNet, progress=False)
    c = read_contribution(result.run_dir)
    assert c is not None and c.method == "shapley" and c.metric == "loss" and len(c.per_round) == 2
    value = {s.site: s.shapley for s in c.sites}
    # symmetry: the duplicated site's updates are its twin's, so are its values
    assert value["a"] == pytest.approx(value["a_twin"], abs=1e-9)
    # the site with random labels contributes nothing or harms, and less than every real site
    assert value["noisy"] <= 1e-3 and value["noisy"] < min(value["a"], value["b"])
    # efficiency, round by round: the values add up to the gain of all updates over none
    for r in c.per_round:
        assert r.estimator.value == "exact" and r.evaluations == 2**4 and r.halfwidths is None
        assert sum(r.shapley) == pytest.approx(r.utility_all - r.utility_start, abs=1e-9)
    assert sum(value.values()) == pytest.approx(c.gain, abs=1e-9)
    # the model of all updates is the round's global model, evaluated and pooled as site "all"
    # (utilities of loss are negated); the next round starts from it
    val_loss = {r["round"]: r["value"] for r in result.metrics
                if r["arm"] == "federated" and r["site"] == "all" and r["split"] == "val" and r["metric"] == "loss"}
    assert [-r.utility_all for r in c.per_round] == pytest.approx([val_loss[1], val_loss[2]], abs=1e-9)
    assert c.per_round[1].utility_start == c.per_round[0].utility_all
    report = (result.run_dir / "report.html").read_text()
    assert "Contribution of each site" in report and "noisy" in report
    # measuring changes nothing of the training: the same records as a run without the section
    plain = medfed.run(_job(tmp_path, "plain"), datasets=_datasets(), model=TinyNet, progress=False)
    assert [r for r in plain.metrics if r["arm"] == "federated"] == [r for r in result.metrics if r["arm"] == "federated"]
    assert not (plain.run_dir / "contribution.json").exists()


def test_sampled_shapley_above_six_sites_with_intervals_last_round_only(tmp_path):
    job = _job(tmp_path, contribution={"samples": 12, "rounds": "last", "truncation": 0})
    result = medfed.run(job, datasets=_datasets(extra=3), model=TinyNet, progress=False)
    raw = json.loads((result.run_dir / "contribution.json").read_text())
    c = read_contribution(result.run_dir)
    assert [r.round for r in c.per_round] == [2] and c.rounds == "last" and c.metric == "auc"
    (r,) = c.per_round
    assert r.estimator.value == "sampled" and len(r.sites) == 7 and r.evaluations < 2**7
    # efficiency holds for every sampled order (no truncation), so for their mean
    assert sum(r.shapley) == pytest.approx(r.utility_all - r.utility_start, abs=1e-9)
    by_site = {s.site: s for s in c.sites}
    for s in c.sites:
        assert s.ci95 is not None and s.ci95[0] <= s.shapley <= s.ci95[1] and s.rounds == 1
    # the twins' values are the same figure estimated twice: their intervals overlap
    a, twin = by_site["a"], by_site["a_twin"]
    assert a.ci95[0] <= twin.ci95[1] and twin.ci95[0] <= a.ci95[1]
    assert raw["sites"][0]["ci95"] == list(a.ci95) and raw["per_round"][0]["estimator"] == "sampled"


def test_leave_one_out_alone(tmp_path):
    job = _job(tmp_path, rounds=1, contribution={"method": "loo", "metric": "loss"})
    result = medfed.run(job, datasets=_datasets(), model=TinyNet, progress=False)
    c = read_contribution(result.run_dir)
    (r,) = c.per_round
    assert r.estimator.value == "loo" and r.shapley is None and r.evaluations == 4 + 1
    assert all(s.shapley is None and s.ci95 is None for s in c.sites)
    loo = {s.site: s.loo for s in c.sites}
    assert loo["noisy"] < 0 < loo["b"]


# --------------------------------------------------------------------------- the tracker, with a fake transport


class ScoringTransport(Transport):
    """Each site scores a model by its parameter ``w`` (val auc = w); ``broken`` sites fail."""

    def __init__(self, broken=()):
        self.broken = set(broken)
        self.asked = 0

    def fit(self, requests, timeout):
        raise AssertionError("contribution never trains")

    def evaluate(self, requests, timeout):
        self.asked += len(requests)
        return [SiteFailure(r.site, "disk gone") if r.site in self.broken else
                [EvalResult(r.site, s, 10, {"auc": float(r.params["w"])}) for s in r.splits] for r in requests]


def _update(site: str, w: float, n: int) -> Update:
    return Update(site=site, round=1, params={"w": torch.tensor(w), "kept": torch.tensor(9.0)}, num_examples=n,
                  num_steps=1)


def test_tracker_rebuilds_each_subset_by_fedavgs_rule_and_skips_a_round_it_cannot_measure():
    job = _parse()
    start = {"w": torch.tensor(0.5), "kept": torch.tensor(1.0), "local": torch.tensor(2.0)}
    updates = [_update("a", 0.9, 30), _update("b", 0.6, 10), _update("c", 0.5, 20)]
    transport = ScoringTransport()
    tracker = ContributionTracker(job, transport, frozen=frozenset({"kept"}))
    tracker.observe(1, start, updates)
    (r,) = tracker.rounds
    assert r.utility_start == pytest.approx(0.5) and r.utility_all == pytest.approx((27 + 6 + 10) / 60)
    assert sum(r.shapley) == pytest.approx(r.utility_all - r.utility_start)
    assert r.loo[2] == pytest.approx(r.utility_all - (27 + 6) / 40)
    assert transport.asked == 2**3 * 5  # every subset's model, at each of the 5 training sites
    model = subset_model(start, updates[:2], frozenset({"kept"}))
    assert float(model["w"]) == pytest.approx(0.825) and float(model["kept"]) == 1.0 and float(model["local"]) == 2.0
    # a site that cannot evaluate: the round is left out, said why, and the run goes on
    broken = ContributionTracker(job, ScoringTransport(broken={"d"}))
    broken.observe(1, start, updates)
    c = broken.result()
    assert c.per_round == () and c.skipped[0][0] == 1 and "site 'd' could not evaluate" in c.skipped[0][1]
    assert [s.rounds for s in c.sites] == [0] * 5


def test_a_malformed_contribution_file_is_named(tmp_path):
    (tmp_path / "contribution.json").write_text('{"method": "shapley"}')
    with pytest.raises(RunDirError, match="contribution.json' is not a contribution file medfed wrote"):
        read_contribution(tmp_path)
    assert read_contribution(tmp_path / "nowhere") is None


# --------------------------------------------------------------------------- the job's checks

SITES = [{"name": n, "n_train": 20, "n_test": 5} for n in ("a", "b", "c", "d", "e")]
BASE = {"name": "t", "output": "out", "rounds": 2, "data": {"source": "synthetic", "sites": SITES},
        "model": {"name": "small_cnn", "norm": "group"}, "task": {"labels": "binary"}, "contribution": {}}
DP = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}


def _parse(**over) -> Job:
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(over))
    return parse_job(raw, "job.yaml")


@pytest.mark.parametrize("over,expected", [
    ({"privacy": {"secure_aggregation": {}}},
     "contribution: needs each site's own update, but privacy.secure_aggregation shows the server only their sum"),
    ({"privacy": {"dp": DP}}, "contribution: privacy.dp with noise: central protects the released model only"),
    ({"robust": {"rule": "median"}}, "but robust: median combines them otherwise"),
    ({"algorithm": {"name": "fedadam"}}, "'fedadam' takes a server optimizer step from that mean"),
    ({"algorithm": {"name": "scaffold"}, "train": {"momentum": 0}}, "'scaffold' also sends control variates"),
    ({"contribution": {"metric": "dice"}}, "contribution.metric: 'dice' is not a classification metric"),
    ({"contribution": {"samples": 1}}, "contribution.samples: must be >= 2"),
    ({"contribution": {"method": "banzhaf"}}, "contribution.method"),
    ({"contribution": {"truncation": -0.1}}, "contribution.truncation: must be >= 0"),
    ({"contribution": {"sites": 3}}, "contribution.sites"),
    ({"topology": {"kind": "cyclic"}}, "topology.kind: cyclic passes the model from site to site"),
])
def test_contribution_refuses_what_it_cannot_compute(over, expected):
    with pytest.raises(ConfigError) as e:
        _parse(**over)
    assert expected in str(e.value)


def test_contribution_goes_with_local_dp_and_enters_the_hash_only_when_set(monkeypatch):
    job = _parse(privacy={"dp": {**DP, "noise": "local"}}, contribution={"method": "loo", "metric": "loss"})
    assert job.contribution.method == "loo" and job.contribution.samples == 200
    without = _parse(contribution=None)
    assert _parse().job_hash() != without.job_hash()
    dump = Job.model_dump

    def older(self, *a, **k):  # the job as dumped before the section existed
        body = dump(self, *a, **k)
        body.pop("contribution", None)
        return body

    before = without.job_hash()
    monkeypatch.setattr(Job, "model_dump", older)
    assert without.job_hash() == before


def test_the_deployed_server_refuses_contribution(tmp_path):
    from medfed.server.deploy import serve_job

    job = parse_job({**BASE, "output": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=r"contribution: computed by simulations \(medfed run\) only"):
        serve_job(job, kit=None)  # refused before the kit is used or a folder is made
    assert not (tmp_path / "out").exists()
