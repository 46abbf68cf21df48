import copy
from collections import Counter

import pytest

from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.server.sampling import SiteSampler

BASE = {
    "name": "s", "output": "o", "rounds": 1, "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
    "data": {"source": "synthetic", "sites": [{"name": f"h{i}", "n_train": 10, "n_test": 5} for i in range(10)]},
}


def _job(**kw):
    return parse_job({**copy.deepcopy(BASE), **kw})


def test_default_is_every_site_every_round():
    assert SiteSampler(_job()).select(3) == [(i, f"h{i}") for i in range(10)]


def test_fraction_count_and_minimum():
    assert _job(sampling={"fraction": 0.25}).sites_per_round == 3  # ceil(2.5)
    assert _job(sampling={"count": 4}).sites_per_round == 4
    assert _job(sampling={"fraction": 0.1, "minimum": 2}).sites_per_round == 2
    assert _job(sampling={"count": 4}).quorum == 4
    assert _job(sampling={"count": 4}, min_sites=2).quorum == 2


def test_draws_are_repeatable_sorted_and_vary_by_round():
    s = SiteSampler(_job(seed=7, sampling={"count": 3}))
    picks = [s.select(r) for r in range(1, 21)]
    assert picks == [SiteSampler(_job(seed=7, sampling={"count": 3})).select(r) for r in range(1, 21)]
    assert all(len(p) == 3 and [i for i, _ in p] == sorted(i for i, _ in p) for p in picks)
    assert len({tuple(p) for p in picks}) > 10


def test_size_weighting_favours_large_sites():
    sizes = {f"h{i}": (1000 if i == 0 else 10) for i in range(10)}
    s = SiteSampler(_job(sampling={"count": 1, "method": "size"}), sizes)
    counts = Counter(s.select(r)[0][1] for r in range(1, 201))
    assert counts["h0"] > 150  # p = 1000 / 1090 ~ 0.92
    u = SiteSampler(_job(sampling={"count": 1}), sizes)
    assert Counter(u.select(r)[0][1] for r in range(1, 201))["h0"] < 50  # p = 0.1


@pytest.mark.parametrize(
    "kw,expected",
    [({"sampling": {"fraction": 0.5, "count": 2}}, "give either fraction or count"),
     ({"sampling": {"fraction": 1.5}}, "sampling.fraction: must be <= 1"),
     ({"sampling": {"count": 11}}, "sampling.count: is 11 but the job has only 10 training sites"),
     ({"sampling": {"count": 2}, "min_sites": 3}, "min_sites: is 3 but only 2 of the 10 sites train in a round"),
     ({"sampling": {"method": "random"}}, "sampling.method: must be one of"),
     ({"sampling": {"count": 2, "candidates": 4}}, "candidates: is for method: loss"),
     ({"sampling": {"count": 3, "method": "loss", "candidates": 2}}, "sampling.candidates: is 2 but must be at least the 3"),
     ({"sampling": {"count": 3, "method": "loss", "candidates": 11}}, "sampling.candidates: is 11 but must be at least"),
     ({"sampling": {"count": 3, "method": "loss"}, "privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0,
                                                                     "delta": 1e-5}}},
      "sampling.method: DP accounting assumes every site is equally likely")],
)
def test_bad_sampling_settings_name_the_field(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        _job(**kw)


def _update(site, loss):
    import torch

    from medfed.core.types import Update

    return Update(site, 1, {"w": torch.zeros(1)}, 10, 1, {"loss": loss})


def test_sampling_by_loss_picks_the_drawn_sites_with_the_highest_last_loss():
    s = SiteSampler(_job(seed=3, sampling={"count": 2, "method": "loss", "candidates": 5}))
    first = s.candidates_of(1)
    assert len(first) == 5 and first == SiteSampler(_job(seed=3, sampling={"count": 2, "method": "loss",
                                                                             "candidates": 5})).candidates_of(1)
    # no loss known: the first two candidates in job order
    assert [n for _, n in s.select(1)] == first[:2]
    s.observe([_update(n, float(i)) for i, n in enumerate(SiteSampler(_job()).names)])  # h9 has the highest loss
    drawn = s.candidates_of(2)
    expected = sorted(drawn, key=lambda n: -int(n[1:]))[:2]
    assert [n for _, n in s.select(2)] == sorted(expected, key=lambda n: int(n[1:]))
    s.losses.pop(drawn[0])  # a site not seen yet comes before any loss
    assert drawn[0] in [n for _, n in s.select(2)]
    s.observe([_update("h0", float("nan"))])  # a NaN loss is not remembered
    assert "h0" in s.losses and s.losses["h0"] == 0.0


def test_the_default_candidates_are_twice_the_round_and_the_hash_keeps_older_jobs():
    assert SiteSampler(_job(sampling={"count": 2, "method": "loss"})).candidates == 4
    assert SiteSampler(_job(sampling={"count": 6, "method": "loss"})).candidates == 10
    assert _job(sampling={"count": 2}).job_hash() == _job(sampling={"count": 2, "candidates": None}).job_hash()
    assert _job(sampling={"count": 2, "method": "loss"}).job_hash() != _job(sampling={"count": 2}).job_hash()


def test_a_run_sampling_by_loss_records_who_was_chosen_over_whom(tmp_path):
    import medfed

    job = {"name": "pow", "seed": 1, "output": str(tmp_path / "run"), "rounds": 3, "threads": 1, "device": "cpu",
           "data": {"source": "synthetic", "image_size": 16, "sites": [
               {"name": f"h{i}", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.2 + 0.1 * i}
               for i in range(6)]},
           "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
           "train": {"batch_size": 8, "lr": 0.05}, "sampling": {"count": 2, "method": "loss", "candidates": 4}}
    records = medfed.run(job, progress=False).metrics
    chosen = [r for r in records if r["metric"] == "chosen"]
    for rnd in (1, 2, 3):
        mine = {r["site"]: r["value"] for r in chosen if r["round"] == rnd}
        assert len(mine) == 4 and sum(mine.values()) == 2
        trained = {r["site"] for r in records if r["round"] == rnd and r["metric"] == "loss" and r["split"] == "train"
                   and r["arm"] == "federated" and r["site"] not in ("all", "median")}
        assert trained == {s for s, v in mine.items() if v == 1.0}
