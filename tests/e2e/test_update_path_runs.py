"""Whole simulated runs through the update path: DP with a budget, compression, robust
rules under attack, and the process pool agreeing with the in-process transport."""

import copy

import pytest
import torch

from medfed.config import parse_job
from medfed.robust.attacks import choose_attackers
from medfed.server.checkpoint import load_checkpoint
from medfed.server.runner import run_job
from medfed.tracking.metrics import read_metrics

TINY = {
    "name": "tiny",
    "seed": 5,
    "rounds": 3,
    "threads": 1,
    "data": {
        "source": "synthetic",
        "image_size": 16,
        "sites": [
            {"name": n, "n_train": 24, "n_val": 8, "n_test": 8, "prevalence": 0.4} for n in ("a", "b", "c", "d", "e")
        ],
    },
    "model": {"name": "small_cnn", "width": 4, "norm": "group"},  # site-level DP refuses batch norm
    "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05},
}


def _run(tmp_path, name="run", **over):
    raw = {**copy.deepcopy(TINY), "output": str(tmp_path / name), **copy.deepcopy(over)}
    job = parse_job(raw)
    run_dir = run_job(job).run_dir
    return job, run_dir, read_metrics(run_dir / "metrics.jsonl")


def _values(records, metric, site="all"):
    return {r["round"]: r["value"] for r in records if r["metric"] == metric and r["site"] == site}


def test_central_dp_records_epsilon_and_stops_at_the_budget(tmp_path):
    dp = {"noise_multiplier": 1.0, "clip": 0.5, "delta": 1e-5, "max_epsilon": 8.0}
    job, run_dir, recs = _run(tmp_path, rounds=10, sampling={"count": 2}, privacy={"dp": dp})
    eps = _values(recs, "epsilon")
    assert 1 < len(eps) < 10  # the budget stopped training early
    assert all(v <= 8.0 for v in eps.values())
    assert list(eps.values()) == sorted(eps.values())
    assert _values(recs, "clip") == {r: 0.5 for r in eps}
    last = max(eps)
    assert any(r["round"] == last and r["split"] == "test" for r in recs)  # the last round run is evaluated
    html = (run_dir / "report.html").read_text()
    assert "Differential privacy" in html and "Training stopped after round" in html
    assert "stopped after round" in (run_dir / "run.log").read_text()


def test_budget_below_the_first_round_is_refused(tmp_path):
    from medfed.core.errors import ConfigError

    dp = {"noise_multiplier": 0.5, "clip": 0.5, "delta": 1e-5, "max_epsilon": 0.01}
    with pytest.raises(ConfigError, match="privacy.dp.max_epsilon: 0.01 is passed after round 1"):
        _run(tmp_path, privacy={"dp": dp})


def test_central_dp_noise_moves_the_model_and_repeats_with_the_seed(tmp_path):
    dp = {"noise_multiplier": 1.0, "clip": 0.5, "delta": 1e-5, "adaptive": {"count_noise_multiplier": 2.0}}
    _, one, recs = _run(tmp_path, "one", rounds=2, privacy={"dp": dp})
    _, two, _ = _run(tmp_path, "two", rounds=2, privacy={"dp": dp})
    _, plain, _ = _run(tmp_path, "plain", rounds=2)
    a, b, c = (load_checkpoint(d / "model_final")[0] for d in (one, two, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    clip = _values(recs, "clip")
    assert clip[1] == 0.5 and clip[2] != 0.5  # adaptive clipping moved the bound
    assert set(_values(recs, "unclipped_fraction")) == {1, 2}


# a 6.4 kB model of 20 tensors: per-tensor scales and whole integer buffers weigh a little
@pytest.mark.parametrize("compression,ratio", [({"method": "fp16"}, 0.52), ({"method": "int8"}, 0.28),
                                               ({"method": "topk", "fraction": 0.1}, 0.22)])
def test_compression_cuts_the_bytes_sent(tmp_path, compression, ratio):
    _, run_dir, recs = _run(tmp_path, rounds=2, compression=compression)
    model = _values(recs, "model_bytes")[1]
    sent = [r["value"] for r in recs if r["metric"] == "bytes_sent"]
    assert len(sent) == 10
    # integer buffers travel whole, top-k sends an int32 index per float32 value
    assert all(v <= model * ratio for v in sent)
    assert "Communication" in (run_dir / "report.html").read_text()


def test_median_resists_sign_flipping_where_the_mean_does_not(tmp_path):
    attack = {"kind": "scale", "fraction": 0.2, "scale": 50.0}
    assert choose_attackers(["a", "b", "c", "d", "e"], 0.2, 5) != []
    _, clean, _ = _run(tmp_path, "clean", rounds=1)
    _, mean, _ = _run(tmp_path, "mean", rounds=1, attack=attack)
    _, median, _ = _run(tmp_path, "median", rounds=1, attack=attack, robust={"rule": "median"})
    ref, m, r = (load_checkpoint(d / "model_final")[0] for d in (clean, mean, median))

    def dist(p):
        return sum(float((p[k] - ref[k]).double().norm() ** 2) for k in ref if ref[k].is_floating_point()) ** 0.5

    assert dist(r) * 5 < dist(m)
    assert "Simulated attack" in (median / "report.html").read_text()


def test_pool_transport_equals_in_process_through_the_update_path(tmp_path):
    over = {"rounds": 2, "privacy": {"dp": {"noise_multiplier": 0.5, "clip": 1.0, "delta": 1e-5, "noise": "local"}},
            "compression": {"method": "topk", "fraction": 0.3}}
    _, a, _ = _run(tmp_path, "inprocess", **over)
    _, b, _ = _run(tmp_path, "pool", transport="pool", workers=2, **over)
    pa, pb = load_checkpoint(a / "model_final")[0], load_checkpoint(b / "model_final")[0]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_secure_aggregation_gives_the_plain_mean_and_the_pool_agrees(tmp_path):
    over = {"rounds": 2, "privacy": {"secure_aggregation": {"clip_range": 0.5}}}
    _, plain, _ = _run(tmp_path, "plain", rounds=2)
    _, secure, recs = _run(tmp_path, "secure", **over)
    _, pooled, _ = _run(tmp_path, "pooled", transport="pool", workers=2, **over)
    p, s, q = (load_checkpoint(d / "model_final")[0] for d in (plain, secure, pooled))
    assert all(torch.equal(s[k], q[k]) for k in s)  # masks cancel exactly; the rounding is seeded
    for k in p:
        if p[k].is_floating_point():
            assert torch.allclose(s[k], p[k], atol=1e-4), k  # only the ring's rounding differs
        else:  # step counters are not summed: the global model keeps its own
            assert torch.equal(s[k], torch.zeros_like(s[k])), k
    assert _values(recs, "secagg_survivors") == {1: 5.0, 2: 5.0}
    assert "Secure aggregation" in (secure / "report.html").read_text()


def test_secagg_plus_gives_the_complete_graphs_model_in_process_and_in_the_pool(tmp_path):
    """Five sites on a ring (SecAgg+, k = 2): each masks with two others, yet the model is
    the complete graph's bit for bit, in process and in the process pool."""
    sparse = {"rounds": 2, "privacy": {"secure_aggregation": {"clip_range": 0.5, "graph": "sparse", "neighbours": 2}}}
    _, complete, _ = _run(tmp_path, "complete", rounds=2, privacy={"secure_aggregation": {"clip_range": 0.5}})
    _, ring, recs = _run(tmp_path, "sparse", **sparse)
    _, pooled, _ = _run(tmp_path, "sparse_pool", transport="pool", workers=2, **sparse)
    c, s, q = (load_checkpoint(d / "model_final")[0] for d in (complete, ring, pooled))
    assert all(torch.equal(s[k], c[k]) and torch.equal(s[k], q[k]) for k in c)
    assert _values(recs, "secagg_survivors") == {1: 5.0, 2: 5.0}


def test_dp_sgd_run_records_the_worst_sites_epsilon(tmp_path):
    from medfed.privacy.accounting import epsilon_schedule
    from medfed.privacy.dpsgd import sample_rate, steps_per_round

    sgd = {"noise_multiplier": 1.2, "max_grad_norm": 1.0, "delta": 1e-5}
    data = copy.deepcopy(TINY["data"])
    data["sites"][0]["n_train"] = 12  # the smallest site samples at the highest rate
    job, run_dir, recs = _run(tmp_path, rounds=2, data=data, privacy={"dp_sgd": sgd})
    eps = _values(recs, "epsilon")
    worst = epsilon_schedule(1.2, sample_rate(12, 8), steps_per_round(12, 8, 1), 2, 1e-5)
    assert eps == {1: worst[0], 2: worst[1]}
    final = load_checkpoint(run_dir / "model_final")[0]
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    assert "sample-level DP-SGD" in (run_dir / "report.html").read_text()
