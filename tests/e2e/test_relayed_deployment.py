"""Cyclic and swarm topologies in a real deployment on 127.0.0.1: a server process and
three site processes. The server only relays models the sites seal for each other
(server/relay.py, site/peers.py, transport/pki/sealing.py): each topology gives its
simulation's metrics, the server holds no model, a model altered on the way is refused and
audited, and a server killed with SIGKILL mid-run resumes to the same result."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from deploy_kits import SITES, make_kits, start, stop, wait_for
from medfed.config import load_job
from medfed.server.runner import run_job
from test_deployment import _log, _sites, _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BYTES = {"bytes_sent", "model_bytes"}  # a deployment counts the sealed messages it relayed


def _metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["round"], r["arm"], r["site"], r["split"], r["metric"]): r["value"] for r in rows
            if r["metric"] not in BYTES}


def _simulated(job_path: Path, tmp: Path) -> dict:
    job = load_job(job_path).model_copy(update={"output": tmp / "simulated"})
    return _metrics(run_job(job).run_dir)


def _done(run: Path) -> int:
    p = run / "relay-state.json"
    try:
        return json.loads(p.read_text())["done"] if p.exists() else 0
    except ValueError:  # being replaced
        return 0


def test_deployed_cyclic_equals_its_simulation_and_the_server_holds_no_model(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=2, compare=[], topology={"kind": "cyclic", "order": "shuffled"})
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values())
    run = tmp_path / "deployed"
    assert _metrics(run) == _simulated(job, tmp_path)
    assert not list(run.glob("model_*")) and not (run / "state.safetensors").exists()
    log = _log(run)
    assert "relaying the sealed passed-on model of site" in log and "sha256" in log
    assert "the model stays at the sites" in log


def test_a_model_altered_by_the_relay_is_refused_by_the_site_and_audited(tmp_path, monkeypatch):
    from medfed.server import relay
    from medfed.server.deploy import serve_job
    from medfed.transport.pki import load_kit

    kits, port = make_kits(tmp_path)
    job = load_job(_small(tmp_path, "deployed", rounds=1, compare=[], topology={"kind": "cyclic"}))
    real = relay.sealed_start

    def altering(env):  # a relay that changes one byte of the model it passes on
        start = real(env)
        ct = start["envelope"]["ciphertext"]
        start["envelope"]["ciphertext"] = ("B" if ct[0] != "B" else "C") + ct[1:]
        return start

    monkeypatch.setattr(relay, "sealed_start", altering)
    sites = _sites(kits, tmp_path)
    try:
        result = serve_job(job, load_kit(kits / "server", role="server"), listen=f"127.0.0.1:{port}")
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(*sites.values())
    run = result.run_dir
    log = _log(run)
    # the first site trained from the initial model; the two after it refused what the relay altered
    assert log.count("its signature does not verify (the message was altered on the way)") >= 2
    assert "cyclic round 1: site 'hospital_b' skipped" in log and "cyclic round 1: site 'hospital_c' skipped" in log
    audit = json.loads((run / "audit.json").read_text())["rows"]
    refused = [a for a in audit if "signature does not verify" in json.dumps(a)]
    assert {a["site"] for a in refused} >= {"hospital_b", "hospital_c"}
    site_logs = "".join((tmp_path / f"{s}.log").read_text() for s in SITES)
    assert "site 'hospital_b' refused the message relayed as from site 'hospital_a'" in " ".join(site_logs.split())


def test_a_swarm_server_killed_mid_run_resumes_to_its_simulation(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=5, compare=[], topology={"kind": "swarm", "merge": "gossip", "peers": 1})
    run = tmp_path / "deployed"
    args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    resumed = None
    try:
        wait_for(lambda: _done(run) >= 1 and "swarm round 2" in _log(run), 180, "round 2 to start")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        resumed = start([*args, "--resume"], tmp_path / "server2.log")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values(), *([resumed] if resumed else []))
    assert "resuming job 'quickstart' (swarm learning" in _log(run)
    assert _metrics(run) == _simulated(job, tmp_path)
