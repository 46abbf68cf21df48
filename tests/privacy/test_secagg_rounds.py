"""Secure aggregation driven by the round loop over a transport: the server gets the
weighted mean of the survivors' changes and nothing else; too few survivors abort."""

import copy
import json

import pytest
import torch

from medfed.algorithms.fedavg import FedAvg
from medfed.config import parse_job
from medfed.core.errors import RoundError
from medfed.core.types import EvalResult, SiteFailure, Update
from medfed.privacy.secagg.integration import MASKED, SecAggClient, SecureSum, from_wire, to_wire
from medfed.server.federation import Federation
from medfed.server.loop import run_federated
from medfed.server.sampling import SiteSampler
from medfed.server.update_path import incoming_for
from medfed.transport.base import Transport

SIZES = {"a": 10, "b": 30, "c": 60, "d": 20, "e": 40}
JOB = {
    "name": "t", "output": "o", "rounds": 1, "min_sites": 3,
    "data": {"source": "synthetic", "sites": [{"name": s, "n_train": n, "n_test": 5} for s, n in SIZES.items()]},
    "model": {"name": "small_cnn", "norm": "group"}, "task": {"labels": "binary"},
    "privacy": {"secure_aggregation": {"threshold": 3, "clip_range": 1.0}},
}
SHIFT = {"a": 0.1, "b": -0.2, "c": 0.3, "d": 0.05, "e": -0.15}


class SecAggSites(Transport):
    """Each site adds SHIFT[site] to every float entry and 1 to the counter, then masks its
    update with a real SecAggClient; messages go through JSON as on a network."""

    def __init__(self, job, fail_fit=(), fail_unmask=()):
        self.clients = {s: SecAggClient(job, s) for s in SIZES}
        self.fail_fit, self.fail_unmask = set(fail_fit), set(fail_unmask)
        self.seen: list[Update] = []

    def fit(self, requests, timeout):
        out = []
        for r in requests:
            if r.site in self.fail_fit:
                out.append(SiteFailure(r.site, "ConnectionError: lost"))
                continue
            params = {k: v + SHIFT[r.site] if v.is_floating_point() else v + 1 for k, v in r.params.items()}
            update = Update(r.site, r.plan.round, params, SIZES[r.site], 1, {"loss": 1.0})
            masked = self.clients[r.site].apply(update, r.params, r.plan)
            self.seen.append(masked)
            out.append(masked)
        return out

    def exchange(self, messages, timeout):
        out = []
        for m in messages:
            if m.topic == "secagg/unmask" and m.site in self.fail_unmask:
                out.append(SiteFailure(m.site, "ConnectionError: lost"))
                continue
            reply = self.clients[m.site].answer(m.topic, m.round, json.loads(json.dumps(m.body)))
            out.append(json.loads(json.dumps(reply)))
        return out

    def evaluate(self, requests, timeout):
        return [[EvalResult(r.site, s, 5, {"auc": 0.5}) for s in r.splits] for r in requests]


def _run(transport, job, init):
    algo = FedAvg(combiner=SecureSum(job, transport, SIZES, noise_seed=0))
    return run_federated(Federation(job, algo, incoming_for(job), SiteSampler(job)), transport, init, lambda *r: None)


def _job(**over):
    raw = copy.deepcopy(JOB)
    raw.update(over)
    return parse_job(raw)


INIT = {"w": torch.linspace(-1, 1, 5000), "b": torch.zeros(3), "n": torch.tensor(7)}


@pytest.mark.parametrize("fail_fit,fail_unmask", [((), ()), (("b",), ()), (("a", "e"), ()), (("d",), ("c",))])
def test_the_server_gets_the_survivors_weighted_mean(fail_fit, fail_unmask):
    job = _job()
    sites = SecAggSites(job, fail_fit, fail_unmask)
    out = _run(sites, job, INIT)
    alive = [s for s in SIZES if s not in fail_fit]
    mean_shift = sum(SIZES[s] * SHIFT[s] for s in alive) / sum(SIZES[s] for s in alive)
    step = sites.clients["a"].codec.step
    for k in ("w", "b"):
        # each site's weighted change is off by less than one step; the mean by len(alive) steps / total weight
        assert torch.allclose(out[k], INIT[k] + mean_shift, atol=len(alive) * step / 0.1 + 1e-6)
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64  # counters are not summed: the server keeps its own
    # what reached the server: one ring vector per site, never the change itself
    assert all(u.params.keys() == {MASKED} and u.params[MASKED].dtype == torch.int32 for u in sites.seen)


def test_a_masked_update_does_not_reveal_the_change():
    job = _job()
    sites = SecAggSites(job)
    _run(sites, job, INIT)
    y = from_wire(sites.seen[0].params[MASKED]).double()
    # the change is a constant 0.1 per entry; the masked vector is spread over the ring
    assert y.std() > 2**30 and abs(float(torch.corrcoef(torch.stack([y[:5000], INIT["w"].double()]))[0, 1])) < 0.1


def test_fewer_survivors_than_the_threshold_abort_the_round():
    job = _job(min_sites=3)
    with pytest.raises(RoundError, match="only 2 .* the threshold is 3"):
        _run(SecAggSites(job, fail_unmask=("a", "b", "c")), job, INIT)
    with pytest.raises(RoundError, match="quorum is 3|threshold is 3"):
        _run(SecAggSites(job, fail_fit=("a", "b", "c")), job, INIT)


def test_central_dp_noise_is_added_to_the_secure_mean():
    dp = {"noise_multiplier": 1.0, "clip": 0.5, "delta": 1e-5}
    job = _job(privacy={"secure_aggregation": {"threshold": 3}, "dp": dp})
    sites = SecAggSites(job)
    algo = FedAvg(combiner=SecureSum(job, sites, SIZES, central=job.privacy.dp, noise_seed=1))
    init = {"w": torch.zeros(200_000)}
    out = run_federated(Federation(job, algo, incoming_for(job), SiteSampler(job)), sites, init, lambda *r: None)
    noise = out["w"] - sum(SHIFT.values()) / 5  # equal weights under DP
    assert float(noise.std()) == pytest.approx(1.0 * 0.5 / 5, rel=0.03)


def test_a_server_optimizer_takes_the_secure_mean_and_keeps_every_entry():
    from medfed.algorithms.fedopt import FedOpt

    job = _job(algorithm={"name": "fedavgm", "server_lr": 1.0, "beta1": 0.0})
    sites = SecAggSites(job)
    algo = FedOpt("fedavgm", 1.0, 0.0, 0.99, 1e-3, trainable=frozenset({"w", "b"}),
                  combiner=SecureSum(job, sites, SIZES, noise_seed=0))
    out = run_federated(Federation(job, algo, incoming_for(job), SiteSampler(job)), sites, INIT, lambda *r: None)
    assert out.keys() == INIT.keys() and out["n"].item() == 7
    mean_shift = sum(SIZES[s] * SHIFT[s] for s in SIZES) / sum(SIZES.values())
    assert torch.allclose(out["w"], INIT["w"] + mean_shift, atol=1e-6)  # FedAvgM with beta1 0, lr 1 is FedAvg


def test_ring_values_travel_in_32_bits():
    ring = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    assert to_wire(ring).dtype == torch.int32
    assert torch.equal(from_wire(to_wire(ring)), ring)
