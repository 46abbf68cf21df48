"""Topologies without a central aggregator: cyclical weight transfer and swarm learning
(leader, gossip, BrainTorrent), with a fake transport whose results can be computed by hand,
and on real runs where the issue asks for bit-for-bit equalities."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file

import medfed
from medfed.algorithms.fedavg import FedAvg
from medfed.config import parse_job
from medfed.core.errors import ConfigError, RoundError
from medfed.core.types import EvalResult, SiteFailure, Update
from medfed.server.cyclic import visiting_order
from medfed.server.federation import Federation
from medfed.server.sampling import SiteSampler
from medfed.server.swarm import CONSENSUS_DISTANCE, draw_peers, elect_leader
from medfed.server.topologies import train_federation
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
SIZES = {"a": 10, "b": 30, "c": 60}


class Doubling(Transport):
    """Site s sends 2 w + shift[s]: the order of the visits changes the result."""

    def __init__(self, shift, broken=()):
        self.shift, self.broken = shift, set(broken)
        self.received = []  # (site, round, w[0]) as each fit request carried it

    def fit(self, requests, timeout):
        out = []
        for r in requests:
            self.received.append((r.site, r.plan.round, float(r.params["w"][0])))
            if r.site in self.broken:
                out.append(SiteFailure(r.site, "RuntimeError: disk full"))
                continue
            p = {k: 2 * v + self.shift[r.site] for k, v in r.params.items()}
            out.append(Update(r.site, r.plan.round, p, SIZES[r.site], 1, {"loss": 1.0}))
        return out

    def evaluate(self, requests, timeout):
        return [[EvalResult(r.site, s, 10, {"auc": float(r.params["w"].mean())}) for s in r.splits] for r in requests]


def _run(transport, topology, **overrides):
    job = parse_job({**copy.deepcopy(JOB), "topology": topology, **overrides})
    records, rounds = [], []
    final = train_federation(
        Federation(job, FedAvg(), UpdateFormat(), SiteSampler(job)), transport, {"w": torch.zeros(2)},
        lambda *rec: records.append(rec), lambda s, p: rounds.append((s, p)),
    )
    return final, records, rounds


# ---- cyclic


def test_cyclic_passes_the_model_from_site_to_site_in_the_jobs_order():
    t = Doubling({"a": 1.0, "b": 2.0, "c": 4.0})
    final, records, rounds = _run(t, {"kind": "cyclic"}, rounds=1)
    # 0 -> a: 1 -> b: 4 -> c: 12; each site starts from what the previous one sent
    assert t.received == [("a", 1, 0.0), ("b", 1, 1.0), ("c", 1, 4.0)]
    assert torch.equal(final["w"], torch.full((2,), 12.0))
    sent = {r[2]: r[5] for r in records if r[4] == "bytes_sent"}
    assert sent == {"a": 8, "b": 8, "c": 8}  # each passes the model on once
    assert rounds[0][0].failed == []


def test_cyclic_skips_a_failed_site_and_goes_on_from_the_last_that_succeeded(caplog):
    t = Doubling({"a": 1.0, "b": 2.0, "c": 4.0}, broken={"b"})
    with caplog.at_level(logging.WARNING, logger="medfed"):
        final, _, rounds = _run(t, {"kind": "cyclic"}, rounds=1)
    assert [r for r in t.received if r[0] == "c"] == [("c", 1, 1.0)]  # a's model, b skipped
    assert torch.equal(final["w"], torch.full((2,), 6.0)) and rounds[0][0].failed == ["b"]
    assert "site 'b' skipped; the model goes on from site 'a'" in caplog.text
    with pytest.raises(RoundError, match="every site failed"):
        _run(Doubling({"a": 1.0, "b": 2.0, "c": 4.0}, broken={"a", "b", "c"}), {"kind": "cyclic"})


def test_a_shuffled_order_is_seeded_and_changes_from_round_to_round():
    sites = [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    orders = [tuple(s for _, s in visiting_order(sites, "shuffled", 5, rnd)) for rnd in range(1, 9)]
    assert orders == [tuple(s for _, s in visiting_order(sites, "shuffled", 5, rnd)) for rnd in range(1, 9)]
    assert len(set(orders)) > 1 and all(sorted(o) == ["a", "b", "c", "d"] for o in orders)
    assert visiting_order(sites, "fixed", 5, 3) == sites


# ---- swarm


def test_leader_merging_everyone_is_fedavg():
    t = Doubling({"a": 1.0, "b": 2.0, "c": 4.0})
    final, records, _ = _run(t, {"kind": "swarm", "merge": "leader"}, rounds=1)
    # the example-weighted mean of 1, 2, 4 (2*0 + shift): (10 + 60 + 240) / 100
    assert torch.allclose(final["w"], torch.full((2,), 3.1))
    sent = {r[2]: r[5] for r in records if r[4] == "bytes_sent"}
    leader = elect_leader(["a", "b", "c"], "random", 0, 1, ["a", "b", "c"])
    assert sent[leader] == 8 * 2 and all(v == 8 for s, v in sent.items() if s != leader)


def test_round_robin_leaders_take_turns_and_pass_over_a_site_that_did_not_train():
    sites = ["a", "b", "c"]
    assert [elect_leader(sites, "round_robin", 0, r, sites) for r in (1, 2, 3, 4)] == ["a", "b", "c", "a"]
    assert elect_leader(["a", "c"], "round_robin", 0, 2, sites) == "c"


def test_gossip_merges_each_site_with_its_drawn_peers():
    t = Doubling({"a": 1.0, "b": 2.0, "c": 4.0})
    final, records, _ = _run(t, {"kind": "swarm", "merge": "gossip", "peers": 1}, rounds=1)
    trained = {"a": 1.0, "b": 2.0, "c": 4.0}
    own = {}
    for i, s in enumerate("abc"):
        (p,) = draw_peers(s, list("abc"), 1, 0, 1, i)
        own[s] = (SIZES[s] * trained[s] + SIZES[p] * trained[p]) / (SIZES[s] + SIZES[p])
    personal = {r[2]: r[5] for r in records if r[1] == "personalized" and r[3] == "val" and r[2] in own}
    assert personal == pytest.approx(own)  # each site's own model, evaluated on its own data
    centre = sum(SIZES[s] * own[s] for s in own) / 100
    assert torch.allclose(final["w"], torch.full((2,), centre))  # the consensus
    (dist,) = [r[5] for r in records if r[4] == CONSENSUS_DISTANCE]
    expected = sum(abs(own[s] - centre) * 2 ** 0.5 for s in own) / 3
    assert dist == pytest.approx(expected, rel=1e-6)


def test_braintorrent_merges_one_site_with_the_peers_that_changed():
    t = Doubling({"a": 1.0, "b": 2.0, "c": 4.0})
    _, records, _ = _run(t, {"kind": "swarm", "merge": "braintorrent"}, rounds=1)
    personal = {r[2]: r[5] for r in records if r[1] == "personalized" and r[3] == "val" and r[2] in SIZES}
    merged = [s for s, v in personal.items() if v != pytest.approx({"a": 1.0, "b": 2.0, "c": 4.0}[s])]
    assert len(merged) == 1  # one site merged; the others kept what they trained
    assert personal[merged[0]] == pytest.approx(3.1)  # with every peer (all trained in round 1)
    sent = {r[2]: r[5] for r in records if r[4] == "bytes_sent"}
    assert sent[merged[0]] == 0 and all(v == 8 for s, v in sent.items() if s != merged[0])


# ---- the job


def _job(topology, **extra):
    return {**copy.deepcopy(JOB), "topology": topology, **extra}


@pytest.mark.parametrize("topology,extra,expected", [
    ({"kind": "cyclic"}, {"algorithm": {"name": "scaffold"}, "train": {"momentum": 0}},
     "algorithm.name: 'scaffold' needs a central server's rule or state, but topology.kind: cyclic passes one model"),
    ({"kind": "swarm"}, {"algorithm": {"name": "fedadam"}}, "algorithm.name: 'fedadam' needs a central server's"),
    ({"kind": "swarm", "merge": "gossip"}, {"privacy": {"secure_aggregation": {}}},
     "privacy.secure_aggregation: a secure sum hides each update"),
    ({"kind": "cyclic"}, {"privacy": {"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}}}, "privacy.dp: site-level DP"),
    ({"kind": "cyclic"}, {"robust": {"rule": "median"}}, "robust: a robust rule merges several sites' models"),
    ({"kind": "swarm", "merge": "braintorrent"}, {"robust": {"rule": "median"}}, "robust: a robust rule"),
    ({"kind": "swarm", "merge": "gossip", "peers": 3}, {}, "topology.peers: 3 peers, but a site has only 2 other"),
    ({"kind": "ring"}, {}, "topology"),
])
def test_what_a_topology_cannot_do_is_refused_naming_both_fields(topology, extra, expected):
    with pytest.raises(ConfigError) as e:
        parse_job(_job(topology, **extra))
    assert expected in str(e.value)


def test_robust_rules_fit_leader_and_gossip_and_the_hash_is_kept_for_server_jobs():
    for merge in ("leader", "gossip"):
        parse_job(_job({"kind": "swarm", "merge": merge}, robust={"rule": "median"}))
    plain = parse_job(copy.deepcopy(JOB))
    assert parse_job(_job({"kind": "server"})).job_hash() == plain.job_hash()
    assert parse_job(_job({"kind": "cyclic"})).job_hash() != plain.job_hash()


# ---- real runs


def _real(tmp_path, out, topology=None, sites=3, report=False, **extra):
    job = {"name": "topo", "seed": 1, "output": str(tmp_path / out), "rounds": 2, "threads": 1, "device": "cpu",
           "data": {"source": "synthetic", "image_size": 16, "sites": [
               {"name": f"s{i}", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5} for i in range(sites)]},
           "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
           "train": {"batch_size": 8, "lr": 0.05}, **extra}
    if topology is not None:
        job["topology"] = topology
    run_dir = medfed.run(job, progress=False).run_dir
    if report:
        return (run_dir / "report.html").read_text()
    return load_file(run_dir / "model_final.safetensors")


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_real_runs_leader_equals_fedavg_and_one_site_cyclic_equals_its_training(tmp_path):
    assert _equal(_real(tmp_path, "leader", {"kind": "swarm", "merge": "leader"}), _real(tmp_path, "fedavg"))
    assert _equal(_real(tmp_path, "cyclic1", {"kind": "cyclic"}, sites=1), _real(tmp_path, "fedavg1", sites=1))
    fedbn = {"algorithm": {"name": "fedbn"}}
    assert _equal(_real(tmp_path, "leader-bn", {"kind": "swarm", "merge": "leader", "leader": "round_robin"}, **fedbn),
                  _real(tmp_path, "fedavg-bn", **fedbn))


def test_a_gossip_run_reports_its_topology_and_the_spread_of_the_sites_models(tmp_path):
    html = _real(tmp_path, "gossip", {"kind": "swarm", "merge": "gossip", "peers": 1}, report=True)
    assert "swarm learning, gossip: each site merges with 1 peer(s) drawn each round" in html
    assert "consensus distance" in html and "personalized" in html


def test_dp_sgd_in_a_cyclic_run_counts_epsilon_and_stops_at_the_budget(tmp_path, caplog):
    dp = {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}}
    job = {"name": "dp", "seed": 1, "output": str(tmp_path / "unbounded"), "rounds": 3, "threads": 1, "device": "cpu",
           "data": {"source": "synthetic", "image_size": 16, "sites": [
               {"name": f"s{i}", "n_train": 32, "n_val": 8, "n_test": 8, "prevalence": 0.5} for i in range(2)]},
           "model": {"name": "small_cnn", "width": 4, "norm": "group"}, "task": {"labels": "binary"},
           "train": {"batch_size": 8, "lr": 0.05}, "topology": {"kind": "cyclic"}, "privacy": dp}
    eps = [r["value"] for r in medfed.run(job, progress=False).metrics if r["metric"] == "epsilon"]
    assert len(eps) == 3 and eps == sorted(eps) and eps[0] > 0
    dp["dp_sgd"]["max_epsilon"] = (eps[1] + eps[2]) / 2  # room for two rounds
    with caplog.at_level(logging.WARNING, logger="medfed"):
        bounded = medfed.run(dict(job, output=str(tmp_path / "bounded")), progress=False)
    assert max(r["round"] for r in bounded.metrics if r["arm"] == "federated") == 2
    assert "federated training stopped after round 2 of 3" in caplog.text


def test_a_bad_topology_field_is_named_as_the_user_writes_it():
    with pytest.raises(ConfigError) as e:
        parse_job(_job({"kind": "swarm", "merge": "gossip", "peers": 0}))
    assert "topology.peers: must be at least 1" in str(e.value) or "topology.peers: " in str(e.value)
    assert "topology.swarm" not in str(e.value)
