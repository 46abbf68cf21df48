"""A real deployment on 127.0.0.1: one server process and three site processes talking
gRPC over mutual TLS. The deployed model must equal the simulated one bit for bit, also
after the server is killed and resumed; a site killed mid-round must not stall the run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deploy_kits import SITES, make_kits, start, stop, wait_for
from medfed.config import builtin_job_path, load_job
from medfed.server.runner import run_job

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _job(tmp: Path, name: str, **over) -> Path:
    raw = yaml.safe_load(builtin_job_path("quickstart").read_text())
    raw.update({"output": str(tmp / name), "threads": 1, "round_timeout": 60, **over})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _small(tmp: Path, name: str, **over) -> Path:
    """Three small sites: quick rounds."""
    path = _job(tmp, name, **over)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["image_size"] = 16
    for site, n in zip(raw["data"]["sites"], (160, 120, 200)):
        site.update(n_train=n, n_val=20, n_test=20)
    path.write_text(yaml.safe_dump(raw))
    return path


def _log(run: Path) -> str:
    p = run / "run.log"
    return p.read_text() if p.exists() else ""


def _simulate(job_path: Path, tmp: Path) -> dict:
    job = load_job(job_path)
    job = job.model_copy(update={"output": tmp / "simulated", "compare": [c for c in job.compare if c != "centralized"]})
    return load_file(str(run_job(job).run_dir / "model_final.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sites(kits: Path, tmp: Path, names=SITES, tag=""):
    return {s: start(["site", "--kit", str(kits / s), "--give-up-after", "120"], tmp / f"{s}{tag}.log") for s in names}


def _deploy(tmp: Path, job: Path) -> Path:
    """Run ``job`` with a server and the three sites to the end; return the run folder."""
    kits, port = make_kits(tmp)
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp / "server.log")
    sites = _sites(kits, tmp)
    try:
        assert server.wait(timeout=300) == 0, (tmp / "server.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values())
    return tmp / "deployed"


def test_deployed_quickstart_equals_the_simulation(tmp_path):
    job = _job(tmp_path, "deployed", rounds=3, compare=["local"])
    run = _deploy(tmp_path, job)
    deployed = load_file(str(run / "model_final.safetensors"))
    assert _same(deployed, _simulate(job, tmp_path))
    audit = json.loads((run / "audit.json").read_text())["rows"]
    fits = [r for r in audit if r["kind"] == "fit" and r["arm"] == "federated"]
    assert len(fits) == 9 and {r["status"] for r in fits} == {"accepted"}
    assert all(len(r["sha256"]) == 64 and r["bytes_received"] > 0 for r in fits)
    # the model is sent for round 1; later rounds train the model each site evaluated at the
    # end of the round before, which it still holds: the audit shows nothing sent
    assert {(r["round"], r["bytes_sent"] > 0) for r in fits} == {(1, True), (2, False), (3, False)}
    assert "Audit" in (run / "report.html").read_text()
    assert json.loads((run / "run.json").read_text())["mode"] == "deployment"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["arm"] for m in metrics} == {"federated", "local"}
    # every site's evaluation was accepted: its val and test figures are recorded each round
    evaluated = {(m["round"], m["site"], m["split"]) for m in metrics
                 if m["arm"] == "federated" and m["metric"] == "auc" and m["value"] is not None}
    assert evaluated >= {(r, s, sp) for r in (1, 2, 3) for s in (*SITES, "all", "median") for sp in ("val", "test")}
    assert not [r for r in audit if r["status"] != "accepted"]
    # the run folder names sites, their addresses and what they sent: the server's user only
    assert run.stat().st_mode & 0o077 == 0
    for name in ("run.log", "report.html", "sites.json", "job.yaml", "audit.json", "state.sqlite"):
        assert (run / name).stat().st_mode & 0o077 == 0, name


def test_server_killed_and_resumed_ends_with_the_uninterrupted_model(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=5)
    run = tmp_path / "deployed"
    args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    resumed = None
    try:
        wait_for(lambda: "federated round 2/5 done" in _log(run), 120, "round 2")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert not (run / "run.json").exists()
        resumed = start([*args, "--resume"], tmp_path / "server2.log")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values(), *([resumed] if resumed else []))
    assert "resuming job 'quickstart' after round" in _log(run)
    assert _same(load_file(str(run / "model_final.safetensors")), _simulate(job, tmp_path))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(m["round"], m["arm"], m["site"], m["split"], m["metric"]) for m in metrics]
    assert len(keys) == len(set(keys)) and max(m["round"] for m in metrics) == 5  # redone rounds not doubled


def test_a_site_killed_mid_round_does_not_stall_the_run_and_rejoins(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=5, min_sites=2, round_timeout=20,
                 train={"local_epochs": 3, "batch_size": 16, "lr": 0.02, "optimizer": "sgd", "momentum": 0.9})
    run = tmp_path / "deployed"
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    restarted = None
    try:
        victim = tmp_path / "hospital_c.log"
        wait_for(lambda: "federated round 2: training" in victim.read_text(), 120, "hospital_c training round 2")
        sites["hospital_c"].send_signal(signal.SIGKILL)
        sites["hospital_c"].wait(timeout=10)
        restarted = start(["site", "--kit", str(kits / "hospital_c"), "--give-up-after", "120"],
                          tmp_path / "hospital_c2.log")
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for p in (sites["hospital_a"], sites["hospital_b"], restarted):
            assert p.wait(timeout=30) == 0
    finally:
        stop(server, *sites.values(), *([restarted] if restarted else []))
    audit = json.loads((run / "audit.json").read_text())["rows"]
    c = [(r["round"], r["status"]) for r in audit if r["site"] == "hospital_c" and r["kind"] == "fit"]
    lost = [rnd for rnd, status in c if status != "accepted"]
    assert lost, c  # the round it was killed in went on without it...
    assert any(rnd > lost[0] and status == "accepted" for rnd, status in c), c  # ...and it came back
    assert "site 'hospital_c' left out" in _log(run)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("over", [
    {"privacy": {"secure_aggregation": {"clip_range": 0.5}}},
    # SecAgg+'s code path (the drawn sites sent, the graph recomputed and checked at each
    # site, per-site rosters); with three sites its graph (k = 2) is the complete one
    {"privacy": {"secure_aggregation": {"clip_range": 0.5, "graph": "sparse", "neighbours": 2}}},
    {"compression": {"method": "topk", "fraction": 0.2}, "robust": {"rule": "trimmed_mean", "trim": 0.34}},
], ids=["secure-aggregation", "secagg-plus", "topk-trimmed-mean"])
def test_deployed_update_path_equals_the_simulation(tmp_path, over):
    job = _small(tmp_path, "deployed", rounds=2, compare=[], **over)
    run = _deploy(tmp_path, job)
    assert _same(load_file(str(run / "model_final.safetensors")), _simulate(job, tmp_path))
    audit = json.loads((run / "audit.json").read_text())["rows"]
    fits = [r for r in audit if r["kind"] == "fit" and r["arm"] == "federated"]
    assert len(fits) == 6 and {r["status"] for r in fits} == {"accepted"}
    if "privacy" in over:  # key exchange and unmasking travel as their own exchanges
        assert {r["status"] for r in audit if r["kind"] == "exchange"} == {"accepted"}
        assert len([r for r in audit if r["kind"] == "exchange"]) == 2 * 3 * 3
        for s in SITES:  # signed with the kits' keys, checked against the CA (privacy/secagg/signing.py)
            assert "signs its keys with its kit key" in " ".join((tmp_path / f"{s}.log").read_text().split())


def test_deployed_central_dp_spends_the_budget_it_reports(tmp_path):
    dp = {"noise_multiplier": 2.0, "clip": 1.0, "delta": 1e-5, "max_epsilon": 3.5}
    job = _small(tmp_path, "deployed", rounds=4, compare=[], privacy={"dp": dp},
                 model={"name": "small_cnn", "width": 16, "norm": "group"})
    run = _deploy(tmp_path, job)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eps = {m["round"]: m["value"] for m in metrics if m["metric"] == "epsilon"}
    assert list(eps) == [1, 2] and all(v <= 3.5 for v in eps.values())  # round 3 would pass the budget
    assert "stopped after round 2 of 4" in _log(run)
    final = load_file(str(run / "model_final.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
