"""A site revoked while a deployment runs (``medfed provision --revoke``): the running
server, whose kit gets the new list, refuses the site at its next call without a restart,
logs and audits why, and the run finishes with the sites that remain."""

from __future__ import annotations

import json

import pytest

from deploy_kits import make_kits, start, stop, wait_for
from medfed.transport.pki.revocation import revoke
from test_deployment import _log, _sites, _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_site_revoked_during_the_run_is_refused_at_once(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=4, compare=[], min_sites=2, round_timeout=30)
    run = tmp_path / "deployed"
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    try:
        wait_for(lambda: "federated round 1/4 done" in _log(run), 120, "round 1")
        revoke(kits, "hospital_c")  # the provision folder's server kit is the running server's
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for s in ("hospital_a", "hospital_b"):
            assert sites[s].wait(timeout=30) == 0
        assert sites["hospital_c"].wait(timeout=30) != 0  # the revoked site stops, saying why
    finally:
        stop(server, *sites.values())
    told = " ".join((tmp_path / "hospital_c.log").read_text().split())
    assert "the server refused this site" in told and "was revoked on" in told
    log = _log(run)
    assert "the certificate of site 'hospital_c' (serial" in log and "was revoked on" in log
    audit = json.loads((run / "audit.json").read_text())["rows"]
    fits = [(r["round"], r["status"]) for r in audit if r["site"] == "hospital_c" and r["kind"] == "fit"]
    assert (1, "accepted") in fits and not [rnd for rnd, status in fits if rnd >= 3 and status == "accepted"]
    assert any(r["site"] == "hospital_c" and "revoked" in (r.get("reason") or "") for r in audit)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
