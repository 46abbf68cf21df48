"""Cyclic and swarm topologies relayed by the server (server/relay.py, site/peers.py):
the sites hold, merge and evaluate the models and the server only passes on what they
seal. Run here in one process with unsealed messages, each relayed topology must give its
simulation's metrics bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from medfed.config import parse_job
from medfed.core.errors import RoundError, SiteError
from medfed.core.params import nbytes
from medfed.data.sites import build_sites
from medfed.models import get_params
from medfed.server.federation import build_federation
from medfed.server.relay import Relay, RelayState, run_cyclic_relayed, run_swarm_relayed
from medfed.server.runner import initial_model
from medfed.server.topologies import train_federation
from medfed.site.app import build_site_apps
from medfed.site.peers import PeerRole
from medfed.transport.inprocess import InProcessTransport

JOB = {
    "name": "relay", "output": "o", "rounds": 2, "seed": 3,
    "data": {"source": "synthetic", "image_size": 16, "sites": [
        {"name": "a", "n_train": 24, "n_val": 8, "n_test": 8},
        {"name": "b", "n_train": 40, "n_val": 8, "n_test": 8, "scanner": {"intensity_offset": 0.2}},
        {"name": "c", "n_train": 32, "n_val": 8, "n_test": 8, "scanner": {"contrast": 1.5}},
        {"name": "d", "n_train": 16, "n_val": 8, "n_test": 8},
    ]},
    "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
    "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.05},
}
# what a relay records differently on purpose: the bytes of sealed messages, and the
# consensus distance only in evaluated rounds
BYTES = {"bytes_sent", "model_bytes"}


def _run(overrides: dict, relayed: bool, break_site: str | None = None, stop_at: tuple[int, str] | None = None):
    """The job's records, simulated or relayed in this process. ``stop_at`` (round, topic):
    the relay stops when it is about to send that message (a server killed there), then
    goes on from the state it saved after the round before, the sites as they were."""
    job = parse_job({**copy.deepcopy(JOB), **overrides})
    sites = build_sites(job)
    model = initial_model(job, sites[0].train.shape[0], 2)
    init = get_params(model)
    apps = build_site_apps(job, sites, torch.device("cpu"))
    if relayed:
        for app in apps.values():
            app.peers = PeerRole(app, job, None)
    transport = InProcessTransport(apps)
    federation = build_federation(job, model, transport, {s.name: len(s.train) for s in sites}, noise_seed=job.seed)
    records = []

    def record(*rec):
        records.append(rec)

    if break_site is not None:
        apps[break_site].peers = None  # answers no relayed message: a failed site
    if not relayed:
        train_federation(federation, transport, init, record)
        return {r[:5]: r[5] for r in records if r[4] not in BYTES}
    loop = run_cyclic_relayed if job.topology.kind == "cyclic" else run_swarm_relayed
    saved = []
    relay = Relay(federation, transport, nbytes(init))
    if stop_at is not None:
        send = relay.send

        def stopping(topic, rnd, bodies):
            if (rnd, topic) == stop_at:
                raise KeyboardInterrupt
            return send(topic, rnd, bodies)

        relay.send = stopping
        with pytest.raises(KeyboardInterrupt):
            loop(federation, relay, init, record, on_state=lambda st: saved.append(copy.deepcopy(st)))
        relay.send = send
        records = [r for r in records if r[0] <= saved[-1].done]  # what the resumed run forgets and redoes
        federation = build_federation(job, model, transport, {s.name: len(s.train) for s in sites},
                                      noise_seed=job.seed)
        relay = Relay(federation, transport, nbytes(init))
    loop(federation, relay, init, record, state=saved[-1] if saved else None)
    return {r[:5]: r[5] for r in records if r[4] not in BYTES}


@pytest.mark.parametrize("topology", [
    {"kind": "cyclic"},
    {"kind": "cyclic", "order": "shuffled"},
    {"kind": "swarm", "merge": "leader"},
    {"kind": "swarm", "merge": "gossip", "peers": 2},
    {"kind": "swarm", "merge": "braintorrent"},
], ids=["cyclic", "cyclic-shuffled", "leader", "gossip", "braintorrent"])
def test_a_relayed_topology_gives_its_simulations_metrics_bit_for_bit(topology):
    overrides = {"topology": topology, "sampling": {"count": 3}}
    simulated, relayed = _run(overrides, False), _run(overrides, True)
    assert relayed.keys() == simulated.keys()
    assert relayed == simulated
    assert any(k[1] == "federated" and k[4] == "auc" for k in relayed)
    if topology.get("merge") in ("gossip", "braintorrent"):
        assert any(k[1] == "personalized" for k in relayed)
        assert any(k[4] == "consensus_distance" for k in relayed)


def test_fedbn_keeps_its_layers_at_the_sites_when_relayed():
    overrides = {"topology": {"kind": "swarm", "merge": "gossip", "peers": 1}, "algorithm": {"name": "fedbn"},
                 "model": {"name": "small_cnn", "norm": "batch"}, "rounds": 2}
    assert _run(overrides, True) == _run(overrides, False)


def test_a_cyclic_site_that_fails_is_skipped_and_the_model_goes_on():
    relayed = _run({"topology": {"kind": "cyclic"}, "rounds": 1}, True, break_site="b")
    trained = {k[2] for k in relayed if k[4] == "loss" and k[2] not in ("all", "median")}
    assert trained == {"a", "c", "d"}
    assert (1, "federated", "b", "test", "auc") not in relayed  # it answers nothing relayed


def test_a_leader_that_cannot_merge_stops_the_round():
    # site a is the leader of round 1 (seeded draw); with it silent the quorum of 4 fails first
    with pytest.raises(RoundError, match="quorum"):
        _run({"topology": {"kind": "swarm", "merge": "leader"}, "rounds": 1}, True, break_site="a")


def test_a_site_refuses_a_model_sealed_for_another_purpose_or_round():
    job = parse_job({**copy.deepcopy(JOB), "topology": {"kind": "swarm", "merge": "leader"}})
    sites = build_sites(job)
    app = build_site_apps(job, sites[:1], torch.device("cpu"))["a"]
    role = PeerRole(app, job, None)
    from medfed.server.relay import init_start, sealed_start
    from medfed.transport.pki.sealing import Label, plain
    from medfed.core import codec

    role.answer("peer.adopt", 1, {"start": init_start(get_params(app.model))})
    payload = bytes(codec.encode_model(get_params(app.model), {}))
    old = plain(payload, Label(job.job_id, 1, "merged", "b"), ["a"])
    with pytest.raises(SiteError, match="replayed"):  # last round's merge offered as this round's
        role.answer("peer.adopt", 3, {"start": sealed_start(old)})
    wrong = plain(payload, Label(job.job_id, 3, "own", "b"), ["a"])
    with pytest.raises(SiteError, match="refused"):
        role.answer("peer.adopt", 3, {"start": sealed_start(wrong)})
    bad = plain(payload[:-8], Label(job.job_id, 3, "merged", "b"), ["a"])
    with pytest.raises(SiteError):
        role.answer("peer.adopt", 3, {"start": sealed_start(bad)})
    trained = plain(payload, Label(job.job_id, 3, "trained", "b", 10), ["a"]).to_wire()
    twice = [{"site": "b", "round": 3, "envelope": trained}, {"site": "b", "round": 3, "envelope": trained}]
    with pytest.raises(SiteError, match="lists a site twice"):  # a relay giving one peer double weight
        role.answer("peer.merge", 3, {"group": twice})


def test_relay_state_round_trips(tmp_path):
    s = RelayState(done=2, carried={"from": "sealed"}, sizes={"a": 3.0}, version={"a": 1}, seen={"a": {"b": 1}},
                   trained_round={"a": 2}, joined=True)
    s.save(tmp_path)
    assert RelayState.load(tmp_path) == s


@pytest.mark.parametrize("topology,stop_at", [
    ({"kind": "cyclic"}, (2, "peer.evaluate")),
    ({"kind": "swarm", "merge": "leader"}, (2, "peer.evaluate")),  # the leader has merged round 2
    ({"kind": "swarm", "merge": "braintorrent"}, (2, "peer.seal")),  # the sites adopted what they trained
], ids=["cyclic", "leader", "braintorrent"])
def test_a_relay_stopped_mid_round_goes_on_as_if_never_stopped(topology, stop_at):
    overrides = {"topology": topology, "rounds": 2, "eval_every": 1}
    assert _run(overrides, True, stop_at=stop_at) == _run(overrides, False)
