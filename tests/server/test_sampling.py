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
     ({"sampling": {"method": "random"}}, "sampling.method: must be one of")],
)
def test_bad_sampling_settings_name_the_field(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        _job(**kw)
