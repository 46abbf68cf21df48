import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from medfed.privacy.accounting import (
    PrivacyLedger,
    adaptive_noise_multiplier,
    epsilon_schedule,
    rounds_within,
)

# the best order sits at an end of Opacus' grid for some settings; Opacus warns, which is fine here
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


def test_gaussian_mechanism_matches_independent_rdp_conversion():
    # sample rate 1: T compositions of the Gaussian mechanism have RDP alpha * T / (2 z^2);
    # converted with Balle et al. 2020, Thm. 21 (what Opacus' get_privacy_spent implements)
    z, steps, rounds, delta = 2.0, 3, 4, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    t = steps * rounds
    rdp = alphas * t / (2 * z**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    expected = float(eps.min())

    got = epsilon_schedule(z, 1.0, steps, rounds, delta)

    assert len(got) == rounds
    assert got[-1] == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(9.00996, abs=1e-4)  # pinned: measured when this test was written


def test_equals_a_stepped_rdp_accountant():
    z, q, delta = 1.1, 0.01, 1e-5
    acc = RDPAccountant()
    for _ in range(300):
        acc.step(noise_multiplier=z, sample_rate=q)

    sched = epsilon_schedule(z, q, steps_per_round=30, rounds=10, delta=delta)

    assert sched[-1] == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    assert 0.5 <= sched[-1] <= 5  # sanity band: DP-SGD's textbook setting gives about 1.15


# small rates and few examples: Opacus' RDP at fractional orders takes ~0.1-1 s per call
@settings(max_examples=8, deadline=None)
@given(
    z=st.floats(0.8, 4.0),
    q=st.floats(1e-3, 0.03),
    steps=st.integers(1, 4),
    rounds=st.integers(1, 12),
    more=st.floats(1.05, 2.0),
)
def test_monotone_in_rounds_noise_and_sample_rate(z, q, steps, rounds, more):
    base = epsilon_schedule(z, q, steps, rounds, 1e-5)
    more_noise = epsilon_schedule(z * more, q, steps, rounds, 1e-5)
    more_sampled = epsilon_schedule(z, min(1.0, q * more), steps, rounds, 1e-5)

    assert all(a <= b for a, b in itertools.pairwise(base))
    assert more_noise[-1] <= base[-1] * (1 + 1e-9)
    assert more_sampled[-1] >= base[-1] * (1 - 1e-9)
    assert all(e >= 0 for e in base)


@settings(max_examples=50, deadline=None)
@given(
    schedule=st.lists(st.floats(0, 50, allow_nan=False), max_size=30).map(sorted),
    budget=st.floats(1e-3, 60),
)
def test_rounds_within_never_allows_a_round_over_budget(schedule, budget):
    n = rounds_within(schedule, budget)
    ledger = PrivacyLedger(schedule, 1e-5, budget, "site-level, central noise")

    assert 0 <= n <= len(schedule)
    assert all(schedule[r] <= budget for r in range(n))
    assert n == len(schedule) or schedule[n] > budget
    assert ledger.last_round == n
    assert all(ledger.epsilon(r) <= budget for r in range(1, len(schedule) + 1) if ledger.allowed(r))


def test_rounds_within_stops_at_first_round_over_budget():
    assert rounds_within([0.5, 1.0, 1.5, 0.9], 1.0) == 2
    assert rounds_within([2.0], 1.0) == 0
    assert rounds_within([], 1.0) == 0


def test_ledger_without_budget_allows_every_scheduled_round():
    ledger = PrivacyLedger([0.1, 0.2, 0.3], 1e-5, None, "site-level, local noise")

    assert ledger.last_round == 3
    assert ledger.allowed(3) and not ledger.allowed(4) and not ledger.allowed(0)
    assert ledger.epsilon(2) == 0.2
    with pytest.raises(ValueError, match="round"):
        ledger.epsilon(4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"steps_per_round": 0}, "steps_per_round"),
        ({"rounds": 0}, "rounds"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, field):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps_per_round": 1, "rounds": 3, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        epsilon_schedule(**args)


def test_bad_budget_and_ledger_arguments_raise():
    with pytest.raises(ValueError, match="max_epsilon"):
        rounds_within([1.0], 0.0)
    with pytest.raises(ValueError, match="max_epsilon"):
        PrivacyLedger([1.0], 1e-5, -1.0, "x")
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger([1.0], 0.0, None, "x")


def test_prv_is_close_to_rdp():
    # every site in every round (q = 1), as in a small consortium; PRV is the tighter bound
    prv = epsilon_schedule(1.0, 1.0, 2, 5, 1e-5, accountant="prv")
    rdp = epsilon_schedule(1.0, 1.0, 2, 5, 1e-5)

    assert len(prv) == 5
    assert prv[-1] == pytest.approx(rdp[-1], rel=0.2)
    assert prv[-1] <= rdp[-1] * 1.01
    assert all(a <= b for a, b in itertools.pairwise(prv))


def test_adaptive_noise_multiplier_keeps_the_total():
    z, sigma_b = 1.0, 5.0
    z_delta = adaptive_noise_multiplier(z, sigma_b)

    # Andrew et al. 2021, Thm. 1: z^-2 = z_delta^-2 + (2 sigma_b)^-2
    assert z_delta > z
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)


def test_adaptive_noise_multiplier_refuses_a_count_that_spends_everything():
    with pytest.raises(ValueError, match="count_noise_multiplier.*noise_multiplier"):
        adaptive_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        adaptive_noise_multiplier(1.0, 0.0)


def test_rounds_released_again_come_first_in_the_composition():
    """A resumed deployment that redid one round after releasing in it: round r costs what
    round r + 1 of the plain schedule does, and the budget allows one round fewer."""
    schedule = [0.1, 0.2, 0.3, 0.4]
    plain = PrivacyLedger(schedule[:3], 1e-5, 0.35, "dp")
    again = PrivacyLedger(schedule, 1e-5, 0.35, "dp", released_again=1)
    assert plain.last_round == 3 and again.last_round == 2
    assert [again.epsilon(r) for r in (1, 2, 3)] == [0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="round: must be in 1..3"):
        again.epsilon(4)
    spent = PrivacyLedger([0.5, 0.6], 1e-5, 0.35, "dp", released_again=1)
    assert spent.last_round == 0  # the earlier releases used the whole budget
