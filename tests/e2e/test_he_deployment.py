"""Homomorphic aggregation in a real deployment: ``medfed he-keys`` writes the consortium's
keys, three ``medfed site`` processes get the secret context and the ``medfed server``
process only the public one; the server adds the sites' CKKS ciphertexts and a site
decrypts the sum. The final model is the plain simulation's within CKKS precision."""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

from deploy_kits import CLI, SITES, make_kits, start, stop
from test_deployment import _simulate, _small

pytest.importorskip("tenseal", reason='homomorphic aggregation is an optional extra: pip install -e ".[he]"')
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_deployed_he_run_equals_the_plain_simulation_within_ckks_precision(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=2, compare=[], privacy={"he": {}})
    plain = _small(tmp_path, "plain", rounds=2, compare=[])
    keys = subprocess.run([*CLI, "he-keys", str(tmp_path / "keys"), "--job", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert keys.returncode == 0, keys.stderr
    secret, public = tmp_path / "keys" / "he-secret.ctx", tmp_path / "keys" / "he-public.ctx"
    assert secret.stat().st_mode & 0o077 == 0 and public.stat().st_mode & 0o077 == 0
    again = subprocess.run([*CLI, "he-keys", str(tmp_path / "keys"), "--job", str(job)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "never overwritten" in again.stderr  # keys are never replaced

    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}",
                    "--he-context", str(public)], tmp_path / "server.log")
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "120", "--he-context", str(secret)],
                      tmp_path / f"{s}.log") for s in SITES}
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values())
    run = tmp_path / "deployed"
    deployed = load_file(str(run / "model_final.safetensors"))
    reference = _simulate(plain, tmp_path)
    assert deployed.keys() == reference.keys()
    worst = max(float((deployed[k].double() - reference[k].double()).abs().max()) for k in reference
                if reference[k].is_floating_point())
    assert 0 < worst < 1e-4, worst  # not the plain sums (CKKS is approximate), within its precision
    audit = json.loads((run / "audit.json").read_text())["rows"]
    fits = [r for r in audit if r["kind"] == "fit" and r["arm"] == "federated"]
    assert len(fits) == 6 and {r["status"] for r in fits} == {"accepted"}
    # the context check once per site, then one decryption per round
    assert sorted(r["status"] for r in audit if r["kind"] == "exchange") == ["accepted"] * 5
    assert all(r["bytes_received"] > 8 * 4 * 1000 for r in fits)  # ciphertexts, far larger than the model


def test_a_site_without_the_secret_context_cannot_take_part(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=1, compare=[], privacy={"he": {}}, round_timeout=20)
    keys = subprocess.run([*CLI, "he-keys", str(tmp_path / "keys"), "--job", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert keys.returncode == 0, keys.stderr
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}",
                    "--he-context", str(tmp_path / "keys" / "he-public.ctx"), "--join-timeout", "15"],
                   tmp_path / "server.log")
    site = start(["site", "--kit", str(kits / SITES[0]), "--give-up-after", "30"], tmp_path / "site.log")
    try:
        server.wait(timeout=120)
    finally:
        stop(server, site)
    text = " ".join((tmp_path / "site.log").read_text().split())
    assert "start this site with --he-context he-secret.ctx" in text
