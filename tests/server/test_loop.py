"""The round loop against a fake transport: no data, no training, known numbers."""

import copy
import logging

import pytest
import torch

from medfed.algorithms.fedavg import FedAvg
from medfed.config import parse_job
from medfed.core.errors import RoundError
from medfed.core.types import Arm, EvalResult, SiteFailure, Update
from medfed.server.federation import Federation
from medfed.server.loop import round_seed, run_federated
from medfed.server.sampling import SiteSampler
from medfed.server.update_path import UpdateFormat
from medfed.transport.base import Transport

JOB = {
    "name": "t", "output": "o", "rounds": 2,
    "data": {"source": "synthetic", "sites": [
        {"name": "a", "n_train": 10, "n_test": 5},
        {"name": "b", "n_train": 30, "n_test": 5},
        {"name": "c", "n_train": 60, "n_test": 5},
    ]},
    "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
}


class FakeTransport(Transport):
    """Site s adds shift[s] to every parameter; it evaluates to auc = 0.5 + mean(w)/100."""

    def __init__(self, shift, sizes, broken=(), poison=()):
        self.shift, self.sizes, self.broken, self.poison = shift, sizes, set(broken), set(poison)
        self.fit_calls = []

    def fit(self, requests, timeout):
        out = []
        for r in requests:
            self.fit_calls.append((r.site, r.plan.round, r.plan.train.seed))
            if r.site in self.broken:
                out.append(SiteFailure(r.site, "RuntimeError: disk full"))
                continue
            p = {k: v + self.shift[r.site] for k, v in r.params.items()}
            if r.site in self.poison:
                p["w"] = p["w"] * float("nan")
            out.append(Update(r.site, r.plan.round, p, self.sizes[r.site], 1, {"loss": 1.0}))
        return out

    def evaluate(self, requests, timeout):
        return [
            [EvalResult(r.site, s, 10, {"auc": 0.5 + float(r.params["w"].mean()) / 100}) for s in r.splits]
            for r in requests
        ]


def _run(transport, **overrides):
    job = parse_job({**copy.deepcopy(JOB), **overrides})
    records, rounds = [], []
    final = run_federated(
        Federation(job, FedAvg(), UpdateFormat(), SiteSampler(job)), transport, {"w": torch.zeros(3)},
        lambda *rec: records.append(rec), lambda s, p: rounds.append((s, p)),
    )
    return final, records, rounds


def test_two_rounds_of_fedavg_hand_computed():
    t = FakeTransport({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10, "b": 30, "c": 60})
    final, records, rounds = _run(t)
    # each round adds the weighted shift (10*1 + 30*2 + 60*4) / 100 = 3.1
    assert torch.allclose(final["w"], torch.full((3,), 6.2))
    assert [s.round for s, _ in rounds] == [1, 2]
    val_all = [r for r in records if r[2] == "all" and r[3] == "val" and r[4] == "auc"]
    assert [round(r[5], 6) for r in val_all] == [0.531, 0.562]
    assert rounds[1][0].means["test"]["auc"] == pytest.approx(0.562)


def test_seeds_differ_by_site_and_round_and_repeat():
    t = FakeTransport({"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1, "b": 1, "c": 1})
    _run(t)
    seeds = [s for _, _, s in t.fit_calls]
    assert len(set(seeds)) == len(seeds) == 6
    assert round_seed(0, Arm.FEDERATED, 1, 0) != round_seed(0, Arm.LOCAL, 1, 0)


def test_failed_and_invalid_sites_are_left_out_and_logged(caplog):
    t = FakeTransport({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10, "b": 30, "c": 60}, broken={"a"}, poison={"b"})
    with caplog.at_level(logging.WARNING, logger="medfed"):
        final, _, rounds = _run(t, min_sites=1)
    assert torch.allclose(final["w"], torch.full((3,), 8.0))  # only c: 4 per round
    assert rounds[0][0].failed == ["a", "b"]
    text = caplog.text
    assert "site 'a' left out: RuntimeError: disk full" in text
    assert "site 'b' left out: tensor 'w' holds NaN or Inf" in text


def test_quorum_not_met_raises():
    t = FakeTransport({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10, "b": 30, "c": 60}, broken={"a", "b"})
    with pytest.raises(RoundError, match="only 1 site\\(s\\) answered, the quorum is 2"):
        _run(t, min_sites=2)


def test_eval_every_skips_rounds_but_not_the_last():
    t = FakeTransport({"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1, "b": 1, "c": 1})
    _, records, _ = _run(t, rounds=5, eval_every=2)
    assert sorted({r[0] for r in records if r[3] == "test"}) == [2, 4, 5]


def test_only_sampled_sites_train_but_all_evaluate():
    t = FakeTransport({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10, "b": 30, "c": 60})
    job = parse_job({**copy.deepcopy(JOB), "rounds": 3, "sampling": {"count": 1}})
    sampler = SiteSampler(job)
    records = []
    run_federated(Federation(job, FedAvg(), UpdateFormat(), sampler), t, {"w": torch.zeros(3)}, lambda *r: records.append(r))
    trained = [(site, rnd) for site, rnd, _ in t.fit_calls]
    assert trained == [(sampler.select(r)[0][1], r) for r in (1, 2, 3)]
    assert {r[2] for r in records if r[3] == "test"} == {"a", "b", "c", "all", "median"}


def test_held_out_site_never_trains_but_is_evaluated_outside_the_mean():
    t = FakeTransport({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10, "b": 30, "c": 60})
    final, records, rounds = _run(t, held_out=["c"])
    assert {site for site, _, _ in t.fit_calls} == {"a", "b"}
    # FedAvg of a and b only: (10*1 + 30*2) / 40 = 1.75 per round
    assert torch.allclose(final["w"], torch.full((3,), 3.5))
    test_sites = {r[2] for r in records if r[3] == "test"}
    assert test_sites == {"a", "b", "c", "all", "median"}
    # every site evaluates the same global model here, so "all" equals each site's value
    last = {r[2]: r[5] for r in records if r[0] == 2 and r[3] == "test" and r[4] == "auc"}
    assert last["all"] == pytest.approx(last["a"]) and last["c"] == pytest.approx(last["a"])


def test_held_out_sites_are_left_out_of_the_mean():
    class PerSite(FakeTransport):
        def evaluate(self, requests, timeout):
            value = {"a": 0.6, "b": 0.8, "c": 0.1}
            return [[EvalResult(r.site, s, 10, {"auc": value[r.site]}) for s in r.splits] for r in requests]

    t = PerSite({"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1, "b": 1, "c": 1})
    _, records, rounds = _run(t, held_out=["c"])
    assert rounds[-1][0].means["test"]["auc"] == pytest.approx(0.7)


def test_local_and_centralized_baselines_leave_held_out_sites_out_of_training():
    from medfed.server.baselines import run_centralized, run_local
    from medfed.transport.base import CENTRALIZED_SITE

    t = FakeTransport({"a": 1.0, "b": 2.0, "c": 4.0, CENTRALIZED_SITE: 0.5}, {"a": 10, "b": 30, "c": 60, CENTRALIZED_SITE: 40})
    job = parse_job({**copy.deepcopy(JOB), "held_out": ["c"]})
    records = []
    local = run_local(job, t, {"w": torch.zeros(3)}, lambda *r: records.append(r))
    assert set(local) == {"a", "b"}
    run_centralized(job, t, {"w": torch.zeros(3)}, lambda *r: records.append(r))
    assert {site for site, _, _ in t.fit_calls} == {"a", "b", CENTRALIZED_SITE}
    centralized_tested = {r[2] for r in records if r[1] == "centralized" and r[3] == "test"}
    assert centralized_tested == {"a", "b", "c", "all", "median"}  # the held-out site evaluates the pooled model


class SkewedEval(FakeTransport):
    """Each site evaluates to its own auc, ``n`` examples each; ``c`` claims a perfect 1.0."""

    AUC = {"a": 0.40, "b": 0.55, "c": 1.0}

    def evaluate(self, requests, timeout):
        return [[EvalResult(r.site, s, self.sizes[r.site], {"auc": self.AUC[r.site]}) for s in r.splits]
                for r in requests]


def test_the_median_over_sites_is_recorded_next_to_the_weighted_mean():
    t = SkewedEval({"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 10, "b": 30, "c": 60})
    _, records, _ = _run(t, rounds=1)
    got = {(r[2], r[3]): r[5] for r in records if r[4] == "auc"}
    assert got[("all", "val")] == pytest.approx((0.4 * 10 + 0.55 * 30 + 1.0 * 60) / 100)
    assert got[("median", "val")] == pytest.approx(0.55) and got[("median", "test")] == pytest.approx(0.55)
