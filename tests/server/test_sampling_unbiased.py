"""``sampling: {method: unbiased}``: draws by data weight over answer rate, combines per
local step with the draw's weights (server/unbiased.py, algorithms/sampled_mean.py)."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms.base import SiteCoefficients
from medfed.algorithms.fedavg import FedAvg
from medfed.algorithms.sampled_mean import SampledMean
from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Update
from medfed.server.federation import Federation
from medfed.server.loop import run_federated
from medfed.server.sampling import SiteSampler
from medfed.server.unbiased import UnbiasedDraw
from medfed.server.update_path import UpdateFormat

from server.test_loop import FakeTransport

BASE = {
    "name": "s", "output": "o", "rounds": 1, "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
    "data": {"source": "synthetic", "sites": [{"name": f"h{i}", "n_train": 10, "n_test": 5} for i in range(6)]},
}
# true answer rates reachable exactly by the smoothing: (answered + 1) / (drawn + 2) with drawn 8
RATES = {"h0": 0.9, "h1": 0.2, "h2": 0.9, "h3": 0.6, "h4": 0.5}
SIZES = {"h0": 10, "h1": 20, "h2": 30, "h3": 25, "h4": 15}
STEPS = {"h0": 1, "h1": 2, "h2": 3, "h3": 2, "h4": 4}
PULL = {"h0": 1.0, "h1": -4.0, "h2": 0.5, "h3": 3.0, "h4": -1.0}  # g_k: each site's update per local step


def _job(**kw):
    return parse_job({**copy.deepcopy(BASE), **kw})


def _draw(k, rates=RATES, seed=0, min_rate=0.05):
    """An UnbiasedDraw whose smoothed answer rates are ``rates`` and whose steps are known."""
    d = UnbiasedDraw(list(SIZES), SIZES, k, seed, min_rate)
    for s, p in rates.items():
        d.drawn[s], d.answered[s] = 8, round(p * 10) - 1
    d.steps.update(STEPS)
    return d


def _one_round(draw, rnd, answer_rng):
    """Round ``rnd`` on scalar models ``θ_k = θ + τ_k g_k`` (θ = 0), each drawn site answering
    with its true rate: the new θ, or None when nobody answered."""
    updates = [Update(s, rnd, {"w": torch.tensor([STEPS[s] * PULL[s]], dtype=torch.float64)}, SIZES[s], STEPS[s])
               for s in draw.draw(rnd) if answer_rng.random() < RATES[s]]
    if not updates:
        return None
    combiner = SampledMean(frozenset({"w"}))
    combiner.weigh(draw.coefficients(rnd, updates))
    return float(combiner.combine({"w": torch.zeros(1, dtype=torch.float64)}, updates, rnd)["w"])


def _w():
    total = sum(SIZES.values())
    return {s: n / total for s, n in SIZES.items()}


def _target():
    w = _w()
    tau_bar = sum(w[s] * STEPS[s] for s in SIZES)
    return tau_bar * sum(w[s] * PULL[s] for s in SIZES)


def test_an_answered_slot_holds_each_site_with_its_data_weight():
    d = _draw(5)
    pi, p_hat = d.chances(), d.rates()
    assert np.allclose(p_hat, [RATES[s] for s in SIZES])
    per_slot = pi * p_hat / (pi * p_hat).sum()  # chance that an answered slot is site k
    assert np.allclose(per_slot, [_w()[s] for s in SIZES], rtol=0, atol=1e-12)
    assert pi[1] > pi[4] > pi[0]  # the 20% site is drawn most often per example


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=2, max_size=8),
       counts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=8, max_size=8),
       min_rate=st.floats(0.01, 1.0))
def test_property_answered_slots_follow_the_data_weights_when_rates_are_above_the_floor(sizes, counts, min_rate):
    names = [f"s{i}" for i in range(len(sizes))]
    d = UnbiasedDraw(names, dict(zip(names, sizes)), 3, 0, min_rate)
    for n, (drawn, answered) in zip(names, counts):
        d.drawn[n], d.answered[n] = drawn, min(answered, drawn)
    pi, p_hat = d.chances(), d.rates()
    assert np.all(p_hat >= min_rate) and np.isclose(pi.sum(), 1.0)
    assert np.allclose(pi * p_hat / (pi * p_hat).sum(), np.array(sizes) / sum(sizes), rtol=1e-9, atol=0)


def test_monte_carlo_of_one_slot_converges_to_the_step_weighted_data_mean():
    d, rng = _draw(1), np.random.default_rng(7)
    got = [v for rnd in range(1, 12001) if (v := _one_round(d, rnd, rng)) is not None]
    drawn = [s for rnd in range(1, 12001) for s in d.draw(rnd)]
    assert drawn.count("h1") / len(drawn) == pytest.approx(d.chances()[1], abs=0.015)  # the 20% site: 46% of slots
    mean, se = float(np.mean(got)), float(np.std(got) / np.sqrt(len(got)))
    assert abs(mean - _target()) < 4 * se, (mean, _target(), se)
    # draws by data weight alone, each site answering at its rate, combined as sent (FedAvg by
    # examples), land elsewhere: the bias the method removes, far outside the tolerance
    biased = sum(RATES[s] * _w()[s] * STEPS[s] * PULL[s] for s in SIZES) / sum(RATES[s] * _w()[s] for s in SIZES)
    assert abs(biased - _target()) > 10 * se


def _exact_mean(k):
    """The expectation of one round's θ (given someone answered) by enumerating slots and
    answers: the estimator's own mean, duplicates answering together."""
    names, w = list(SIZES), _w()
    p = np.array([RATES[s] for s in names])
    pi = np.array([w[s] for s in names]) / p
    pi /= pi.sum()
    tau_bar = sum(w[s] * STEPS[s] for s in names)
    total = nobody = 0.0
    for slots in itertools.product(range(len(names)), repeat=k):
        m = np.bincount(slots, minlength=len(names))
        drawn = [i for i in range(len(names)) if m[i]]
        for answers in itertools.product((0, 1), repeat=len(drawn)):
            chance = np.prod(pi[list(slots)]) * np.prod([p[i] if a else 1 - p[i] for i, a in zip(drawn, answers)])
            got = [i for i, a in zip(drawn, answers) if a]
            if not got:
                nobody += chance
                continue
            big_m = sum(m[i] for i in got)
            total += chance * tau_bar * sum(m[i] * PULL[names[i]] for i in got) / big_m
    return total / (1 - nobody)


def test_monte_carlo_of_three_slots_matches_the_estimators_exact_mean():
    # with several slots a site drawn twice answers for both at once: the exact mean leans
    # towards the reliable sites (documented in server/unbiased.py); the code computes it
    d, rng = _draw(3), np.random.default_rng(11)
    got = [v for rnd in range(1, 8001) if (v := _one_round(d, rnd, rng)) is not None]
    mean, se = float(np.mean(got)), float(np.std(got) / np.sqrt(len(got)))
    assert abs(mean - _exact_mean(3)) < 4 * se, (mean, _exact_mean(3), se)
    assert abs(_exact_mean(1) - _target()) < 1e-12  # one slot: exactly the target
    # the known lean of several slots with few sites (server/unbiased.py, point 2): 0.78 against 0.125 here,
    # the site answering 20% of the time holding 46% of the slots; a change that removes it shows here
    assert _exact_mean(3) - _target() > 0.5


def test_equal_steps_and_every_site_answering_give_the_multiplicity_weighted_mean():
    d = UnbiasedDraw(["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, 4, 0)
    d.slots[1] = {"a": 2, "c": 1}
    updates = [Update("a", 1, {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}, 1, 5),
               Update("c", 1, {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(10)}, 3, 5)]
    d.observe(1, updates)
    c = d.coefficients(1, updates)
    assert c.step == pytest.approx({"a": 2 / 3, "c": 1 / 3}) and c.mean == pytest.approx({"a": 2 / 3, "c": 1 / 3})
    combiner = SampledMean(frozenset({"w"}))
    combiner.weigh(c)
    out = combiner.combine({"w": torch.tensor([9.0, 9.0]), "n": torch.tensor(0)}, updates, 1)
    assert torch.allclose(out["w"], torch.tensor([2.0, 1.0])) and out["n"].item() == 6  # (2*4 + 10) / 3
    with pytest.raises(RuntimeError, match="round 1: sampling.method unbiased combines with the sampler's"):
        combiner.combine({"w": torch.zeros(2), "n": torch.tensor(0)}, updates, 1)  # coefficients serve once


def test_unequal_steps_are_normalized_and_unknown_steps_take_the_median():
    d = UnbiasedDraw(["a", "b", "c"], {"a": 1, "b": 1, "c": 2}, 2, 0)
    d.slots[1] = {"a": 1, "b": 1}
    updates = [Update("a", 1, {"w": torch.zeros(1)}, 1, 2), Update("b", 1, {"w": torch.zeros(1)}, 1, 6)]
    d.observe(1, updates)
    assert d.mean_steps() == pytest.approx(0.25 * 2 + 0.25 * 6 + 0.5 * 4)  # c: the median of 2 and 6
    c = d.coefficients(1, updates)
    assert c.step == pytest.approx({"a": 4 * 0.5 / 2, "b": 4 * 0.5 / 6})


def test_the_weigh_seam_is_refused_by_every_other_combiner():
    with pytest.raises(TypeError, match="combiner 'mean' combines by its own weights"):
        FedAvg().combiner.weigh(SiteCoefficients(1, {}, {}))


def test_same_seed_same_draws_other_seed_other_draws():
    a, b, other = (SiteSampler(_job(seed=s, sampling={"count": 3, "method": "unbiased"}), {f"h{i}": 10 + i
                                                                                            for i in range(6)})
                   for s in (4, 4, 5))
    draws = [a.select(r) for r in range(1, 21)]
    assert draws == [b.select(r) for r in range(1, 21)]
    assert draws != [other.select(r) for r in range(1, 21)]
    assert any(len(x) < 3 for x in draws)  # with replacement: a site drawn twice trains once
    assert all(sum(m for _, m, _ in a.slots(r)) == 3 for r in range(1, 21))


def test_a_site_that_does_not_answer_is_drawn_more_often():
    job = _job(seed=1, sampling={"count": 2, "method": "unbiased"})
    s = SiteSampler(job, {f"h{i}": 10 for i in range(6)})
    for rnd in range(1, 61):
        drawn = s.select(rnd)
        s.observe_answers(rnd, [Update(n, rnd, {}, 10, 1) for _, n in drawn if n != "h0"])
    u = s.unbiased
    assert u.answered["h0"] == 0 and u.drawn["h0"] > 0
    assert u.rates()[0] == pytest.approx(max(0.05, 1 / (u.drawn["h0"] + 2)))
    assert u.chances()[0] > 2 * u.chances()[1]


def test_a_run_with_a_failing_site_counts_answers_and_weighs_by_the_draw():
    t = FakeTransport({f"h{i}": float(i) for i in range(6)}, {f"h{i}": 10 for i in range(6)}, broken={"h1"})
    job = _job(rounds=6, seed=3, min_sites=1, sampling={"count": 3, "method": "unbiased"})
    sampler = SiteSampler(job, {f"h{i}": 10 for i in range(6)})
    records = []
    final = run_federated(Federation(job, FedAvg(combiner=SampledMean(frozenset({"w"}))), UpdateFormat(), sampler),
                          t, {"w": torch.zeros(1)}, lambda *r: records.append(r))
    answered = {(r[0], r[2]): r[5] for r in records if r[4] == "answered"}
    multiplicity = {(r[0], r[2]): r[5] for r in records if r[4] == "multiplicity"}
    assert answered.keys() == multiplicity.keys()
    assert all(v == (0.0 if site == "h1" else 1.0) for (_, site), v in answered.items())
    assert all(sum(v for (rnd, _), v in multiplicity.items() if rnd == r) == 3 for r in range(1, 7))
    # each round moves w by the multiplicity-weighted mean shift of the sites that answered (1 step each)
    expected = 0.0
    for r in range(1, 7):
        got = {s: m for (rnd, s), m in multiplicity.items() if rnd == r and s != "h1"}
        expected += sum(m * int(s[1]) for s, m in got.items()) / sum(got.values())
    assert final["w"].item() == pytest.approx(expected)
    assert sampler.unbiased.answered["h1"] == 0 and sampler.unbiased.drawn["h1"] > 0


def test_a_replayed_sampler_draws_as_the_one_that_ran():
    job = _job(seed=9, sampling={"count": 3, "method": "unbiased"})
    sizes = {f"h{i}": 10 + 3 * i for i in range(6)}
    ran, records = SiteSampler(job, sizes), []
    for rnd in range(1, 5):
        drawn = ran.select(rnd)
        for site, m, _ in ran.slots(rnd):
            records.append({"round": rnd, "arm": "federated", "site": site, "split": "train", "metric": "multiplicity",
                            "value": float(m)})
        for site, ok, steps in ran.observe_answers(rnd, [Update(n, rnd, {}, 10, 2 + rnd) for _, n in drawn
                                                           if n != "h2"]):
            records.append({"round": rnd, "arm": "federated", "site": site, "split": "train", "metric": "answered",
                            "value": 1.0 if ok else 0.0})
            if steps is not None:
                records.append({"round": rnd, "arm": "federated", "site": site, "split": "train",
                                "metric": "steps", "value": float(steps)})
    again = SiteSampler(job, sizes)
    again.replay(records)
    assert again.unbiased.drawn == ran.unbiased.drawn and again.unbiased.answered == ran.unbiased.answered
    assert again.unbiased.steps == ran.unbiased.steps
    assert [again.select(r) for r in range(1, 9)] == [ran.select(r) for r in range(1, 9)]


@pytest.mark.parametrize(
    "kw,expected",
    [({"sampling": {"count": 2, "method": "unbiased", "min_rate": 0}}, "sampling.min_rate"),
     ({"sampling": {"count": 2, "method": "unbiased", "min_rate": 1.5}}, "sampling.min_rate"),
     ({"sampling": {"count": 2, "min_rate": 0.1}}, "min_rate: is for method: unbiased"),
     ({"sampling": {"count": 2, "method": "unbiased"}, "algorithm": {"name": "feddyn"}},
      "sampling.method: unbiased .* algorithm.name 'feddyn'"),
     ({"sampling": {"count": 2, "method": "unbiased"}, "algorithm": {"name": "fednova"}},
      "sampling.method: unbiased .* algorithm.name 'fednova'"),
     ({"sampling": {"count": 3, "method": "unbiased"}, "privacy": {"secure_aggregation": {}}},
      "sampling.method: unbiased .* privacy.secure_aggregation"),
     ({"sampling": {"count": 3, "method": "unbiased"}, "privacy": {"he": {}}},
      "sampling.method: unbiased .* privacy.he"),
     ({"sampling": {"count": 3, "method": "unbiased"}, "robust": {"rule": "median"}},
      "sampling.method: unbiased and robust"),
     ({"sampling": {"count": 3, "method": "unbiased"}, "topology": {"kind": "cyclic"}},
      "sampling.method: unbiased .* topology.kind: cyclic"),
     ({"sampling": {"count": 3, "method": "unbiased"}, "model": {"name": "small_cnn", "norm": "group"},
       "privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}}},
      "sampling.method: DP accounting assumes every site is equally likely")],
)
def test_bad_unbiased_settings_name_the_fields(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        _job(**kw)


def test_unset_min_rate_keeps_older_job_hashes_and_a_set_one_counts():
    assert _job(sampling={"count": 2}).job_hash() == _job(sampling={"count": 2, "min_rate": None}).job_hash()
    a = _job(sampling={"count": 2, "method": "unbiased"})
    assert a.job_hash() != _job(sampling={"count": 2, "method": "unbiased", "min_rate": 0.1}).job_hash()


def test_stopped_with_a_site_failing_then_resumed_equals_the_run_never_stopped(tmp_path, monkeypatch):
    import medfed.server.runner as runner
    from medfed.site.app import SiteApp
    from server.test_resume_simulation import _job as resume_job
    from server.test_resume_simulation import _records, _same_run, _stop_while_training, _stopped_then_resumed

    fit = SiteApp._fit

    def failing(self, params, plan):  # site b never answers a federated round: its answer rate falls
        if plan.arm.value == "federated" and self.name == "b":
            raise RuntimeError("link down")
        return fit(self, params, plan)

    monkeypatch.setattr(SiteApp, "_fit", failing)
    over = {"seed": 5, "rounds": 4, "min_sites": 1, "compare": [], "sampling": {"method": "unbiased", "count": 2}}
    straight = runner.run_job(resume_job(tmp_path, "straight", over)).run_dir
    rows = [json.loads(line) for line in _records(straight)]
    answered = {(r["round"], r["site"]): r["value"] for r in rows if r["metric"] == "answered"}
    assert any(site == "b" and v == 0.0 for (_, site), v in answered.items())  # b was drawn and did not answer
    last = [site for (rnd, site) in answered if rnd == 4 and site != "b"]
    resumed = _stopped_then_resumed(tmp_path, monkeypatch, over, lambda m: _stop_while_training(m, 4, last[-1]))
    _same_run(straight, resumed)
