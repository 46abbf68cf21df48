"""Split learning in a real deployment on 127.0.0.1: a server process and three site
processes. Batch by batch each site streams its activations and gradients (without the U:
its activations and labels) to the server's middle over a Split call (transport/grpc/splitting.py); the run gives its simulation's
metrics bit for bit (the server computes its middle with the job's threads, as the
simulation does), also after the server is killed and resumed, and the audit trail holds
one row per turn."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy_kits import make_kits, start, stop, wait_for
from medfed.config import load_job
from medfed.server.runner import run_job
from test_deployment import _log, _sites, _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BYTES = {"bytes_sent", "bytes_received", "model_bytes"}


def _metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["round"], r["arm"], r["site"], r["split"], r["metric"]): r["value"] for r in rows
            if r["metric"] not in BYTES}


def _bytes(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["round"], r["site"], r["metric"]): r["value"] for r in rows if r["metric"] in BYTES}


def _deploy(tmp: Path, job: Path, kill: bool) -> Path:
    """Run ``job`` to the end; with ``kill``, the server is killed (SIGKILL) once round 1 is
    saved and started again with --resume."""
    kits, port = make_kits(tmp)
    args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp / "server.log")
    sites = _sites(kits, tmp)
    run, resumed = tmp / "deployed", None
    try:
        if kill:
            wait_for(lambda: "split round 1/2 done" in _log(run), 120, "round 1")
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            assert not (run / "run.json").exists()
            server = resumed = start([*args, "--resume"], tmp / "server2.log")
        assert server.wait(timeout=300) == 0, (tmp / ("server2.log" if kill else "server.log")).read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values(), *([resumed] if resumed else []))
    if kill:
        assert "resuming job 'quickstart' after round 1 of 2" in _log(run)
    return run


@pytest.mark.parametrize("parallel,kill,u_shaped", [(False, False, True), (True, True, True), (False, False, False),
                                                    (True, False, False)],
                         ids=["sequential", "splitfed-resumed", "no-u-sequential", "no-u-splitfed"])
def test_deployed_split_learning_equals_its_simulation(tmp_path, parallel, kill, u_shaped):
    """SplitFed also with the server killed after round 1 and resumed: the round redone.
    Without the U each batch's labels go with its activations and the server's loss is the
    site's recorded training loss, as in simulation."""
    topology = {"kind": "split", "cut": "features.0", "parallel": parallel, "u_shaped": u_shaped}
    job = _small(tmp_path, "deployed", rounds=2, compare=[], topology=topology)
    run = _deploy(tmp_path, job, kill)
    simulated = run_job(load_job(job).model_copy(update={"output": tmp_path / "simulated"})).run_dir
    deployed_metrics, simulated_metrics = _metrics(run), _metrics(simulated)
    assert any(k[-1] == "auc" for k in deployed_metrics)
    assert deployed_metrics == simulated_metrics, sorted(
        (k, deployed_metrics.get(k), simulated_metrics.get(k)) for k in deployed_metrics.keys() | simulated_metrics.keys()
        if deployed_metrics.get(k) != simulated_metrics.get(k))[:5]
    # the tensors that crossed the cut, counted as the simulation counts them
    assert _bytes(run) == _bytes(simulated)
    a, b = load_file(run / "model_final.safetensors"), load_file(simulated / "model_final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one audit row per turn: each site, each round, accepted, with the bytes of its frames
    with sqlite3.connect(run / "state.sqlite") as db:
        turns = db.execute("SELECT round, site, status, bytes_sent, bytes_received FROM audit WHERE kind = 'split'"
                           ).fetchall()
    assert sorted(set((r, s, st) for r, s, st, _, _ in turns)) == [
        (r, s, "accepted") for r in (1, 2) for s in ("hospital_a", "hospital_b", "hospital_c")]
    assert all(sent > 0 and received > 0 for *_, sent, received in turns)
    assert "split learning: the sites keep" in _log(run)
    site_log = " ".join((tmp_path / "hospital_a.log").read_text().split())  # the console wraps its lines
    assert "median round trip" in site_log
    assert ("this site's training labels go to the server" in site_log) is not u_shaped
