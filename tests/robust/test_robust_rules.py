import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms.base import WeightedMean
from medfed.core.errors import RoundError
from medfed.core.types import Update
from medfed.robust.rules import CoordinateMedian, Krum, NormBound, TrimmedMean


def _up(site, params, n=10):
    return Update(site, 1, params, num_examples=n, num_steps=1)


def _ups(rows, n=10):
    """One update per row of values, tensor 'w' (float32), sites s0, s1, ..."""
    return [_up(f"s{i}", {"w": torch.tensor(r, dtype=torch.float32)}, n) for i, r in enumerate(rows)]


ZERO2 = {"w": torch.zeros(2)}

# fresh rule objects for the tests that run every rule; Krum needs m >= 2f + 3 = 3
RULES = {
    "median": CoordinateMedian,
    "trimmed_mean": lambda: TrimmedMean(0.2),
    "krum": lambda: Krum(0),
    "multi_krum": lambda: Krum(0, select=2),
    "norm_bound": lambda: NormBound(1e6),
}


# ---------------------------------------------------------------- coordinate median


def test_median_of_odd_count_is_the_middle_value():
    ups = _ups([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0]])
    out = CoordinateMedian().combine(ZERO2, ups, 1)
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0]))


def test_median_of_even_count_is_the_mean_of_the_two_middle_values():
    # global [1, 1]; deltas [0, 3], [2, -1], [9, 1], [-6, 0]
    # coordinate 0 sorted: -6, 0, 2, 9 -> 1; coordinate 1 sorted: -1, 0, 1, 3 -> 0.5
    glob = {"w": torch.tensor([1.0, 1.0])}
    ups = _ups([[1.0, 4.0], [3.0, 0.0], [10.0, 2.0], [-5.0, 1.0]])
    out = CoordinateMedian().combine(glob, ups, 1)
    assert torch.equal(out["w"], torch.tensor([1.0 + 1.0, 1.0 + 0.5]))


def test_median_ignores_example_counts():
    ups = [_up("a", {"w": torch.tensor([0.0])}, 1000), _up("b", {"w": torch.tensor([1.0])}, 1),
           _up("c", {"w": torch.tensor([2.0])}, 1)]
    assert torch.equal(CoordinateMedian().combine({"w": torch.zeros(1)}, ups, 1)["w"], torch.tensor([1.0]))


# ---------------------------------------------------------------- trimmed mean


def test_trimmed_mean_drops_the_extremes():
    # trim 0.25 of m = 4 -> b = 1 per end: [1, 2, 3, 100] -> mean(2, 3) = 2.5
    ups = _ups([[100.0], [1.0], [3.0], [2.0]])
    out = TrimmedMean(0.25).combine({"w": torch.zeros(1)}, ups, 1)
    assert torch.equal(out["w"], torch.tensor([2.5]))


def test_trimmed_mean_with_nothing_to_drop_is_the_plain_mean():
    # trim 0.2 of m = 4 -> b = floor(0.8) = 0; counts do not weigh
    ups = _ups([[100.0], [1.0], [3.0], [2.0]])
    ups[0] = _up("s0", ups[0].params, n=1)
    out = TrimmedMean(0.2).combine({"w": torch.zeros(1)}, ups, 1)
    assert torch.allclose(out["w"], torch.tensor([26.5]))


@pytest.mark.parametrize("trim", [0.5, 0.6, -0.1, math.nan, True])
def test_trimmed_mean_refuses_a_bad_trim(trim):
    with pytest.raises(ValueError, match="trim must be in"):
        TrimmedMean(trim)


def test_trimmed_mean_error_message_names_the_value():
    with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\), got 0.6"):
        TrimmedMean(0.6)


# ---------------------------------------------------------------- krum


def test_krum_picks_the_update_closest_to_its_neighbours():
    # f = 0, m = 4 -> 2 neighbours. Squared distances between deltas 0, 1, 2, 100:
    # scores 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 4 = 5; 100: 98^2 + 99^2 -> site s1 wins
    ups = _ups([[0.0], [1.0], [2.0], [100.0]])
    rule = Krum(0)
    out = rule.combine({"w": torch.zeros(1)}, ups, 1)
    assert rule.name == "krum"
    assert torch.equal(out["w"], torch.tensor([1.0]))
    assert rule.round_metrics() == {"selected": 1.0}


def test_multi_krum_breaks_ties_by_site_order_and_averages():
    # same scores as above: s1 (2), then s0 and s2 tie at 5 -> s0, the lower index
    ups = _ups([[0.0], [1.0], [2.0], [100.0]])
    rule = Krum(0, select=2)
    out = rule.combine({"w": torch.zeros(1)}, ups, 1)
    assert rule.name == "multi_krum"
    assert torch.equal(out["w"], torch.tensor([0.5]))
    assert rule.round_metrics() == {"selected": 2.0}


def test_krum_distances_span_every_tensor():
    # per tensor alone s0 and s1 look alike; over the whole model s1 is far from the rest
    # deltas (w, b): s0 (0, 0), s1 (0, 10), s2 (1, 0), s3 (1, 1); f = 0 -> 2 neighbours
    # scores: s0 1 + 2 = 3; s1 82 + 100 = 182; s2 1 + 1 = 2; s3 1 + 2 = 3 -> s2
    rows = [(0.0, 0.0), (0.0, 10.0), (1.0, 0.0), (1.0, 1.0)]
    ups = [_up(f"s{i}", {"w": torch.tensor([w]), "b": torch.tensor([b])}) for i, (w, b) in enumerate(rows)]
    out = Krum(0).combine({"w": torch.zeros(1), "b": torch.zeros(1)}, ups, 1)
    assert torch.equal(out["w"], torch.tensor([1.0])) and torch.equal(out["b"], torch.tensor([0.0]))


def test_krum_logs_the_selected_sites(caplog):
    ups = _ups([[0.0], [1.0], [2.0], [100.0]])
    with caplog.at_level(logging.INFO, logger="medfed"):
        Krum(0).combine({"w": torch.zeros(1)}, ups, 7)
    assert "['s1']" in caplog.text


def test_krum_needs_two_f_plus_three_updates():
    with pytest.raises(RoundError, match=r"f=1.*m=4"):
        Krum(1).combine({"w": torch.zeros(1)}, _ups([[0.0]] * 4), 1)


def test_krum_cannot_select_more_than_it_has():
    with pytest.raises(RoundError, match="select=4"):
        Krum(0, select=4).combine({"w": torch.zeros(1)}, _ups([[0.0]] * 3), 1)


@pytest.mark.parametrize(("f", "select", "match"), [(-1, 1, "f must"), (1.5, 1, "f must"), (True, 1, "f must"),
                                                    (0, 0, "select must")])
def test_krum_refuses_bad_arguments(f, select, match):
    with pytest.raises(ValueError, match=match):
        Krum(f, select)


# ---------------------------------------------------------------- norm bound


def test_norm_bound_clips_then_takes_the_weighted_mean():
    # s0 delta (3, 4) has norm 5 -> clipped to (0.6, 0.8); s1 (0, 1) has norm 1 -> kept
    # weights 1 and 3: (0.6, 0.8) / 4 + 3 (0, 1) / 4 = (0.15, 0.95)
    ups = [_up("s0", {"w": torch.tensor([3.0, 4.0])}, 1), _up("s1", {"w": torch.tensor([0.0, 1.0])}, 3)]
    rule = NormBound(1.0)
    out = rule.combine(ZERO2, ups, 1)
    assert torch.allclose(out["w"], torch.tensor([0.15, 0.95]), atol=1e-6)
    assert rule.round_metrics() == {"clipped_fraction": 0.5}


@pytest.mark.parametrize("max_norm", [0, -1.0, math.inf, math.nan, "1"])
def test_norm_bound_refuses_a_bad_bound(max_norm):
    with pytest.raises(ValueError, match="max_norm must be"):
        NormBound(max_norm)


def test_rules_report_nothing_before_their_first_round():
    assert Krum(0).round_metrics() == {} and NormBound(1.0).round_metrics() == {}


# ---------------------------------------------------------------- every rule


@pytest.mark.parametrize("make", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_buffers_get_the_weighted_mean_in_their_dtype(make, dtype):
    # counts 10, 30, 30 with weights 2, 1, 1 -> (20 + 30 + 30) / 4 = 20
    glob = {"w": torch.zeros(1), "bn.num_batches_tracked": torch.tensor(0, dtype=dtype)}
    ups = [_up(f"s{i}", {"w": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(c, dtype=dtype)}, n)
           for i, (c, n) in enumerate([(10, 2), (30, 1), (30, 1)])]
    out = make().combine(glob, ups, 1)
    assert out["bn.num_batches_tracked"].dtype == dtype
    assert int(out["bn.num_batches_tracked"]) == 20


@pytest.mark.parametrize("make", RULES.values(), ids=RULES.keys())
def test_result_has_the_updates_names_and_the_global_dtypes(make):
    glob = {"a": torch.zeros(2, dtype=torch.float64), "kept_local": torch.zeros(3),
            "b": torch.zeros(1, dtype=torch.float16), "n": torch.tensor(1)}
    params = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float16), "n": torch.tensor(4)}
    out = make().combine(glob, [_up(f"s{i}", params) for i in range(3)], 1)
    assert list(out) == ["a", "b", "n"]
    assert [t.dtype for t in out.values()] == [torch.float64, torch.float16, torch.int64]
    assert torch.equal(out["a"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("make", RULES.values(), ids=RULES.keys())
def test_updates_with_other_names_are_refused(make):
    ups = _ups([[0.0], [0.0], [0.0]])
    ups[2] = _up("s2", {"v": torch.zeros(1)})
    with pytest.raises(RoundError, match="site 's2'"):
        make().combine({"w": torch.zeros(1), "v": torch.zeros(1)}, ups, 1)


@pytest.mark.parametrize("make", RULES.values(), ids=RULES.keys())
def test_no_updates_is_an_error(make):
    with pytest.raises(RoundError, match="no updates"):
        make().combine({"w": torch.zeros(1)}, [], 1)


# ---------------------------------------------------------------- properties

values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=30, deadline=None)
@given(
    rule=st.sampled_from(sorted(RULES)),
    row=st.lists(values, min_size=1, max_size=6),
    glob=values,
    m=st.integers(3, 7),
)
def test_identical_updates_give_that_update(rule, row, glob, m):
    w = torch.tensor(row, dtype=torch.float32)
    out = RULES[rule]().combine({"w": torch.full_like(w, glob)}, _ups([row] * m), 1)
    assert torch.allclose(out["w"], w, rtol=1e-5, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    rule=st.sampled_from(["median", "trimmed_mean"]),
    rows=st.integers(1, 4).flatmap(lambda n: st.lists(st.lists(values, min_size=n, max_size=n), min_size=1, max_size=8)),
    trim=st.floats(0, 0.49),
)
def test_coordinate_rules_stay_within_the_range_of_the_updates(rule, rows, trim):
    stacked = torch.tensor(rows, dtype=torch.float32)
    combiner = CoordinateMedian() if rule == "median" else TrimmedMean(trim)
    out = combiner.combine({"w": torch.zeros(stacked.shape[1])}, _ups(rows), 1)["w"]
    tol = 1e-4 * stacked.abs().max() + 1e-6  # float32 rounding of a mean
    assert bool((out >= stacked.min(0).values - tol).all()) and bool((out <= stacked.max(0).values + tol).all())


@settings(max_examples=30, deadline=None)
@given(
    f=st.integers(1, 3),
    extra=st.integers(0, 3),
    centre=st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=4),
    data=st.data(),
)
def test_robust_rules_resist_huge_malicious_deltas(f, extra, centre, data):
    n = len(centre)
    honest = f + 3 + extra  # m = f + honest >= 2f + 3, as Krum needs
    noise = st.lists(st.floats(-0.01, 0.01), min_size=n, max_size=n)
    rows = [[c + e for c, e in zip(centre, data.draw(noise))] for _ in range(honest)]
    sign = data.draw(st.sampled_from([1.0, -1.0]))  # colluding attackers push one way
    rows += [[sign * 1e6] * n for _ in range(f)]
    m = len(rows)
    glob = {"w": torch.zeros(n)}
    honest_mean = torch.tensor(rows[:honest], dtype=torch.float64).mean(0)
    max_norm = 3.0  # above every honest norm (<= 2.02), far below the attackers'

    def deviation(rule):
        return float((rule.combine(glob, _ups(rows), 1)["w"].double() - honest_mean).abs().max())

    assert deviation(CoordinateMedian()) <= 0.021
    assert deviation(TrimmedMean((f + 0.5) / m)) <= 0.021
    assert deviation(Krum(f)) <= 0.021
    assert deviation(Krum(f, select=honest - f)) <= 0.021
    # clipped attackers move the mean by at most f (max_norm + honest norm) / m < max_norm
    assert deviation(NormBound(max_norm)) <= max_norm
    assert deviation(WeightedMean()) > 1e4


@settings(max_examples=20, deadline=None)
@given(f=st.integers(0, 4), data=st.data())
def test_krum_raises_with_too_few_updates(f, data):
    m = data.draw(st.integers(1, 2 * f + 2))
    with pytest.raises(RoundError, match=f"f={f}"):
        Krum(f).combine({"w": torch.zeros(1)}, _ups([[float(i)] for i in range(m)]), 1)
