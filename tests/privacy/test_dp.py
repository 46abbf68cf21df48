import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.core.params import delta, l2_norm
from medfed.core.types import Arm, Encoding, RoundPlan, TrainSettings, Update
from medfed.privacy.dp import (
    AdaptiveClipper,
    CentralDP,
    ClipFilter,
    LocalDP,
    central_noise_std,
)


def plan(seed: int = 7) -> RoundPlan:
    train = TrainSettings(local_epochs=1, batch_size=4, lr=0.1, optimizer="sgd", momentum=0.0, weight_decay=0.0, seed=seed)
    return RoundPlan(job_id="job", round=1, arm=Arm.FEDERATED, train=train)


def update(params, site="a", n=10, rnd=1) -> Update:
    return Update(site, rnd, params, num_examples=n, num_steps=1)


def zeros_like(params):
    return {k: torch.zeros_like(v) for k, v in params.items()}


def big_zero_round(m: int, coords: int = 200_000):
    g = {"w": torch.zeros(coords)}
    return g, [update({"w": torch.zeros(coords)}, site=f"s{i}") for i in range(m)]


# ---------------------------------------------------------------- clipping


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40),
    base=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=40, max_size=40),
    bound=st.floats(1e-3, 1e3),
)
def test_clipped_delta_never_exceeds_the_bound(values, base, bound):
    n = len(values)
    g = {"w": torch.tensor(base[:n]), "n": torch.tensor(3)}
    sent = {"w": g["w"] + torch.tensor(values), "n": torch.tensor(5)}
    out = ClipFilter(clip=bound).apply(update(sent), g, plan())

    # what the server recomputes after rounding to float32 is what must stay within the bound
    assert l2_norm(delta(out.params, g)) <= bound
    assert out.params["n"].item() == 5


def test_clip_filter_leaves_small_updates_alone():
    g = {"w": torch.tensor([1.0, 2.0])}
    sent = {"w": torch.tensor([1.5, 2.0])}

    out = ClipFilter(clip=1.0).apply(update(sent), g, plan())

    assert torch.equal(out.params["w"], sent["w"])


def test_clip_filter_scales_large_updates_to_the_bound():
    g = {"w": torch.zeros(2)}
    sent = {"w": torch.tensor([3.0, 4.0])}  # norm 5

    out = ClipFilter(clip=1.0).apply(update(sent), g, plan())

    assert torch.allclose(out.params["w"], torch.tensor([0.6, 0.8]), atol=1e-5)


# ---------------------------------------------------------------- noise scale


def test_central_noise_std_is_z_c_over_m():
    assert central_noise_std(1.2, 0.5, 4) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="num_updates"):
        central_noise_std(1.0, 1.0, 0)


def test_central_noise_has_std_z_c_over_m():
    z, c, m = 1.3, 0.5, 4
    g, ups = big_zero_round(m)

    out = CentralDP(clip=c, noise_multiplier=z, seed=0).combine(g, ups, rnd=1)

    assert out["w"].std().item() == pytest.approx(z * c / m, rel=0.02)
    assert abs(out["w"].mean().item()) < 0.05 * z * c / m


def test_adaptive_central_noise_uses_the_larger_update_multiplier():
    z, sigma_b, c, m = 1.0, 1.0, 2.0, 5
    g, ups = big_zero_round(m)
    dp = CentralDP(clip=c, noise_multiplier=z, adaptive=AdaptiveClipper(0.5, 0.2, sigma_b), seed=1)

    out = dp.combine(g, ups, rnd=1)

    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert out["w"].std().item() == pytest.approx(z_delta * c / m, rel=0.02)


def test_local_noise_has_std_z_c():
    z, c = 0.7, 0.3
    g, (u, *_) = big_zero_round(1)

    out = LocalDP(clip=c, noise_multiplier=z, secure=False).apply(u, g, plan())

    assert out.params["w"].std().item() == pytest.approx(z * c, rel=0.02)


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_bound_shrinks_by_exactly_the_geometric_step_when_all_fit():
    c, lr, q = 2.0, 0.3, 0.4
    g = {"w": torch.zeros(3)}
    ups = [update({"w": torch.tensor([0.1, 0.0, 0.0])}, site=s) for s in "abc"]
    # tiny count noise needs a tiny update multiplier too (2 * sigma_b > z)
    dp = CentralDP(clip=c, noise_multiplier=1e-6, adaptive=AdaptiveClipper(q, lr, 1e-6), seed=0)

    dp.combine(g, ups, rnd=1)

    assert dp.clip == pytest.approx(c * math.exp(-lr * (1 - q)), rel=1e-6)
    assert dp.round_metrics()["clip"] == c
    assert dp.round_metrics()["unclipped_fraction"] == pytest.approx(1.0, abs=1e-5)


def test_adaptive_bound_grows_when_none_fit():
    c, lr, q = 0.01, 0.3, 0.4
    g = {"w": torch.zeros(3)}
    ups = [update({"w": torch.tensor([1.0, 0.0, 0.0])}, site=s) for s in "ab"]
    dp = CentralDP(clip=c, noise_multiplier=1e-6, adaptive=AdaptiveClipper(q, lr, 1e-6), seed=0)

    dp.combine(g, ups, rnd=1)

    assert dp.clip == pytest.approx(c * math.exp(lr * q), rel=1e-6)


def test_adaptive_count_is_noisy():
    g = {"w": torch.zeros(3)}
    ups = [update({"w": torch.tensor([0.1, 0.0, 0.0])}, site=s) for s in "abcd"]
    fractions = []
    for seed in (1, 2):
        dp = CentralDP(clip=1.0, noise_multiplier=1.0, adaptive=AdaptiveClipper(0.5, 0.2, 10.0), seed=seed)
        dp.combine(g, ups, rnd=1)
        fractions.append(dp.round_metrics()["unclipped_fraction"])

    assert fractions[0] != fractions[1]
    assert all(f != 1.0 for f in fractions)  # the exact share (all four fit) is never released


def test_fixed_clipping_reports_only_the_bound():
    g, ups = big_zero_round(2, coords=4)
    dp = CentralDP(clip=1.5, noise_multiplier=1.0, seed=0)

    dp.combine(g, ups, rnd=1)

    assert dp.round_metrics() == {"clip": 1.5}
    assert dp.clip == 1.5


# ---------------------------------------------------------------- randomness


def test_seeded_central_runs_are_reproducible_and_unseeded_runs_differ():
    g, ups = big_zero_round(3, coords=50)

    def run(seed, rnd=1):
        return CentralDP(clip=1.0, noise_multiplier=1.0, seed=seed).combine(g, ups, rnd=rnd)["w"]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5, rnd=1), run(5, rnd=2))
    assert not torch.equal(run(None), run(None))


def test_local_dp_reproducible_from_the_plan_seed_unless_secure():
    g, (u, *_) = big_zero_round(1, coords=50)

    def run(secure, seed=7):
        return LocalDP(clip=1.0, noise_multiplier=1.0, secure=secure).apply(u, g, plan(seed=seed)).params["w"]

    assert torch.equal(run(False), run(False))
    assert not torch.equal(run(False, seed=7), run(False, seed=8))
    assert not torch.equal(run(True), run(True))


# ---------------------------------------------------------------- state and mean


def test_state_round_trip_continues_identically():
    g = {"w": torch.zeros(4)}
    ups = [update({"w": torch.tensor([0.5, 0.0, 0.0, 0.0])}, site=s) for s in "abc"]
    adaptive = AdaptiveClipper(0.5, 0.2, 2.0)
    first = CentralDP(clip=1.0, noise_multiplier=1.0, adaptive=adaptive, seed=3)
    first.combine(g, ups, rnd=1)

    resumed = CentralDP(clip=1.0, noise_multiplier=1.0, adaptive=adaptive, seed=3)
    resumed.load_state(first.state())

    assert first.state()["clip"].dtype == torch.float64 and first.state()["clip"].dim() == 0
    assert resumed.clip == first.clip != 1.0
    assert torch.equal(first.combine(g, ups, rnd=2)["w"], resumed.combine(g, ups, rnd=2)["w"])
    assert resumed.clip == first.clip


def test_load_empty_state_keeps_the_initial_bound_and_unknown_entries_raise():
    dp = CentralDP(clip=0.7, noise_multiplier=1.0)

    dp.load_state({})

    assert dp.clip == 0.7
    with pytest.raises(ValueError, match="unexpected"):
        dp.load_state({"bound": torch.tensor(1.0)})


def test_mean_is_uniform_not_example_weighted():
    g = {"w": torch.zeros(2)}
    ups = [
        update({"w": torch.tensor([1.0, 0.0])}, site="a", n=1000),
        update({"w": torch.tensor([0.0, 3.0])}, site="b", n=1),
    ]

    out = CentralDP(clip=100.0, noise_multiplier=1e-9, seed=0).combine(g, ups, rnd=1)

    assert torch.allclose(out["w"], torch.tensor([0.5, 1.5]), atol=1e-6)


def test_server_clips_each_update():
    g = {"w": torch.zeros(2)}
    ups = [update({"w": torch.tensor([30.0, 40.0])})]  # norm 50

    clipped = CentralDP(clip=1.0, noise_multiplier=1e-9, seed=0).combine(g, ups, rnd=1)

    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8]), atol=1e-5)


def test_integer_buffers_survive_with_their_dtype():
    g = {"w": torch.zeros(2, dtype=torch.float16), "n": torch.tensor(10)}
    ups = [
        update({"w": torch.ones(2, dtype=torch.float16), "n": torch.tensor(20)}, site="a", n=3),
        update({"w": torch.ones(2, dtype=torch.float16), "n": torch.tensor(40)}, site="b", n=1),
    ]

    out = CentralDP(clip=10.0, noise_multiplier=1e-6, seed=0).combine(g, ups, rnd=1)
    local = LocalDP(clip=10.0, noise_multiplier=1.0, secure=False).apply(ups[0], g, plan())

    assert out["w"].dtype == torch.float16 and out["n"].dtype == torch.int64
    assert out["n"].item() == 25  # FedAvg's weighted mean (3 * 20 + 40) / 4, no noise
    assert local.params["n"].dtype == torch.int64 and local.params["n"].item() == 20
    assert local.params["w"].dtype == torch.float16


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CentralDP(clip=0.0, noise_multiplier=1.0), "clip"),
        (lambda: CentralDP(clip=1.0, noise_multiplier=0.0), "noise_multiplier"),
        (lambda: CentralDP(clip=1.0, noise_multiplier=-1.0), "noise_multiplier"),
        (lambda: LocalDP(clip=-1.0, noise_multiplier=1.0, secure=True), "clip"),
        (lambda: LocalDP(clip=1.0, noise_multiplier=0.0, secure=True), "noise_multiplier"),
        (lambda: ClipFilter(clip=0.0), "clip"),
        (lambda: AdaptiveClipper(target_quantile=0.0, lr=0.2, count_noise_multiplier=1.0), "target_quantile"),
        (lambda: AdaptiveClipper(target_quantile=1.0, lr=0.2, count_noise_multiplier=1.0), "target_quantile"),
        (lambda: AdaptiveClipper(target_quantile=0.5, lr=0.0, count_noise_multiplier=1.0), "lr"),
        (lambda: AdaptiveClipper(target_quantile=0.5, lr=0.2, count_noise_multiplier=0.0), "count_noise_multiplier"),
        # the count's noise would spend the whole budget
        (lambda: CentralDP(clip=1.0, noise_multiplier=2.0, adaptive=AdaptiveClipper(0.5, 0.2, 1.0)), "count_noise_multiplier"),
    ],
)
def test_bad_settings_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_local_dp_refuses_encoded_updates():
    g = {"w": torch.zeros(2)}
    u = Update("a", 1, {"w": torch.zeros(2, dtype=torch.float16)}, 1, 1, encoding=Encoding.FP16)

    with pytest.raises(ValueError, match="fp16"):
        LocalDP(clip=1.0, noise_multiplier=1.0, secure=True).apply(u, g, plan())
    with pytest.raises(ValueError, match="fp16"):
        ClipFilter(clip=1.0).apply(u, g, plan())
