"""``sampling: {method: adaptive}``: adaptive client sampling after Active Federated Learning (server/sampling.py)."""

import copy
import math
from collections import Counter

import pytest
import torch

from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Update
from medfed.server.sampling import SiteSampler

BASE = {
    "name": "s", "output": "o", "rounds": 1, "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
    "data": {"source": "synthetic", "sites": [{"name": f"h{i}", "n_train": 10, "n_test": 5} for i in range(10)]},
}


def _job(**kw):
    return parse_job({**copy.deepcopy(BASE), **kw})


def _sampler(sizes=None, **sampling):
    return SiteSampler(_job(seed=5, sampling={"method": "adaptive", **sampling}), sizes)


def _update(site, loss):
    return Update(site, 1, {"w": torch.zeros(1)}, 10, 1, {"loss": loss})


def _names(picks):
    return [n for _, n in picks]


def test_sites_without_a_loss_take_the_valued_places_first_and_the_draw_is_repeatable():
    s = _sampler(count=4, explore=0.25)  # 3 valued places, 1 explored
    s.observe([_update(f"h{i}", 1.0) for i in range(7)])  # h7, h8, h9 have not trained
    picks = _names(s.select(1))
    assert len(picks) == 4 and {"h7", "h8", "h9"} <= set(picks)
    again = _sampler(count=4, explore=0.25)
    again.observe([_update(f"h{i}", 1.0) for i in range(7)])
    assert again.select(1) == s.select(1)
    assert len({tuple(_names(s.select(r))) for r in range(1, 30)}) > 1  # the explored place varies by round


def test_high_value_sites_are_drawn_more_often_and_low_ones_sit_out():
    s = _sampler(count=2, explore=0.0, exclude=0.5, sharpness=2.0)
    s.observe([_update(f"h{i}", float(i)) for i in range(10)])  # h9 the highest loss
    counts = Counter(n for r in range(1, 401) for n in _names(s.select(r)))
    assert sum(counts[f"h{i}"] for i in range(5)) == 0  # the lowest half is excluded
    assert counts["h9"] > counts["h7"] > counts["h5"]
    # chances exp(2 v) over h5..h9, two drawn without replacement: h9 is in with probability
    # P(first) + sum_j P(j first) P(h9 second | j first)
    w = {i: math.exp(2.0 * i) for i in range(5, 10)}
    total = sum(w.values())
    p9 = w[9] / total + sum(w[j] / total * w[9] / (total - w[j]) for j in range(5, 9))
    assert counts["h9"] / 400 == pytest.approx(p9, abs=0.04)


def test_the_value_weighs_the_loss_by_the_square_root_of_the_examples():
    sizes = {f"h{i}": 10 for i in range(10)} | {"h0": 1000}
    s = _sampler(sizes, count=1, explore=0.0, exclude=0.0, sharpness=5.0)
    s.observe([_update(f"h{i}", 1.0) for i in range(10)])
    assert s.values()["h0"] == pytest.approx(math.sqrt(1000)) and s.values()["h1"] == pytest.approx(math.sqrt(10))
    assert Counter(_names(s.select(r))[0] for r in range(1, 101))["h0"] == 100  # e^(5 (31.6 - 3.2)) dominates


def test_with_no_sharpness_and_no_exclusion_every_site_is_equally_likely():
    s = _sampler(count=1, explore=0.0, exclude=0.0, sharpness=0.0)
    s.observe([_update(f"h{i}", float(i)) for i in range(10)])
    counts = Counter(_names(s.select(r))[0] for r in range(1, 2001))
    assert all(150 < counts[f"h{i}"] < 250 for i in range(10))  # 200 expected each


def test_explore_draws_outside_the_valued_pool():
    s = _sampler(count=4, explore=0.5, exclude=0.75, sharpness=50.0)  # 2 valued places, 2 explored
    s.observe([_update(f"h{i}", float(i)) for i in range(10)])  # valued pool: h7, h8, h9 (at least 2 kept)
    seen = Counter(n for r in range(1, 201) for n in _names(s.select(r)))
    assert seen["h9"] == 200  # e^(50 (9 - 8)) makes h9 certain among the valued
    assert sum(seen[f"h{i}"] for i in range(7)) > 0  # the explored places reach the excluded sites


@pytest.mark.parametrize(
    "kw,expected",
    [({"sampling": {"count": 2, "exclude": 0.5}}, "exclude: is for method: adaptive, but method is uniform"),
     ({"sampling": {"count": 2, "method": "loss", "explore": 0.5}}, "explore: is for method: adaptive"),
     ({"sampling": {"count": 2, "method": "adaptive", "exclude": 1.0}}, "sampling.exclude: must be < 1"),
     ({"sampling": {"count": 2, "method": "adaptive", "sharpness": -1}}, "sampling.sharpness"),
     ({"sampling": {"count": 3, "method": "adaptive"}, "privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0,
                                                                         "delta": 1e-5}}},
      "sampling.method: DP accounting assumes every site is equally likely")],
)
def test_bad_adaptive_settings_name_the_field(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        _job(**kw)


def test_unset_adaptive_fields_keep_older_job_hashes_and_set_ones_count():
    assert _job(sampling={"count": 2}).job_hash() == _job(sampling={"count": 2, "exclude": None}).job_hash()
    a = _job(sampling={"count": 2, "method": "adaptive"})
    assert a.job_hash() != _job(sampling={"count": 2, "method": "adaptive", "explore": 0.3}).job_hash()


def test_a_run_sampling_adaptively_records_who_was_chosen(tmp_path):
    import medfed

    job = {"name": "acs", "seed": 2, "output": str(tmp_path / "run"), "rounds": 3, "threads": 1, "device": "cpu",
           "data": {"source": "synthetic", "image_size": 16, "sites": [
               {"name": f"h{i}", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.2 + 0.1 * i}
               for i in range(6)]},
           "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
           "train": {"batch_size": 8, "lr": 0.05}, "sampling": {"count": 2, "method": "adaptive"}}
    records = medfed.run(job, progress=False).metrics
    chosen = [r for r in records if r["metric"] == "chosen"]
    for rnd in (1, 2, 3):
        mine = {r["site"]: r["value"] for r in chosen if r["round"] == rnd}
        assert len(mine) == 6 and sum(mine.values()) == 2
        trained = {r["site"] for r in records if r["round"] == rnd and r["metric"] == "loss" and r["split"] == "train"
                   and r["arm"] == "federated" and r["site"] not in ("all", "median")}
        assert trained == {s for s, v in mine.items() if v == 1.0}
    # rounds 1-3 with 2 places of which 2 valued (explore 0.1 * 2 rounds to 0): the untrained sites go first,
    # so the first three rounds train six different sites
    firsts = [s for rnd in (1, 2, 3) for s, v in {r["site"]: r["value"] for r in chosen if r["round"] == rnd}.items()
              if v == 1.0]
    assert len(set(firsts)) == 6
