"""A MONAI Bundle in a real deployment (one server and three site processes): the bundle
never travels. The site whose operator gave the bundle (``--bundle``) trains with the
bundle's own trainer (``train.engine: bundle``); a site started without ``--bundle`` and a
site whose copy differs (another learning rate in its train.json) refuse the job, saying
why; the run goes on with the one site (the quorum is one)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from bundle_files import make_bundle, seg_job, train_config
from deploy_kits import make_kits, start, stop

pytest.importorskip("ignite", reason="train.engine: bundle needs pytorch-ignite: pip install -e '.[bundle]'")
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SITES = ("hospital_a", "hospital_b", "hospital_c")


def test_a_bundle_runs_only_where_the_site_gave_that_bundle(tmp_path):
    bundle = make_bundle(tmp_path / "server-bundle")
    same = shutil.copytree(bundle, tmp_path / "site-a-bundle")  # another folder, the same code
    other = train_config()
    other["optimizer"]["lr"] = 0.02
    changed = make_bundle(tmp_path / "site-c-bundle", other)
    raw = seg_job(tmp_path, {"bundle": str(bundle)}, rounds=1, min_sites=1)
    raw["data"]["sites"] = [{"name": s, "n_train": 6, "n_val": 2, "n_test": 2} for s in SITES]
    raw["train"] = {"engine": "bundle"}
    raw["output"] = str(tmp_path / "deployed")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    kits, port = make_kits(tmp_path)
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    extra = {"hospital_a": ["--bundle", str(same)], "hospital_b": [], "hospital_c": ["--bundle", str(changed)]}
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "60", *extra[s]], tmp_path / f"{s}.log")
             for s in SITES}
    try:
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert sites["hospital_a"].wait(timeout=30) == 0, (tmp_path / "hospital_a.log").read_text()[-2000:]
        assert sites["hospital_b"].wait(timeout=30) != 0
        assert sites["hospital_c"].wait(timeout=30) != 0
    finally:
        stop(server, *sites.values())
    run = tmp_path / "deployed"
    log = " ".join((run / "run.log").read_text().split())
    digest = json.loads((run / "run.json").read_text())["bundle_sha256"]
    assert "site 'hospital_b' cannot take part in the job" in log
    assert "a site runs only the bundle its operator gives: start this site with --bundle FOLDER" in log
    assert "site 'hospital_c' cannot take part in the job" in log
    assert "but job" in log and f"runs the bundle {digest}; install the consortium's version of the bundle" in log
    assert str(changed) not in log  # the site's own folder stays at the site
    audit = json.loads((run / "audit.json").read_text())["rows"]
    assert {r["site"] for r in audit if r["kind"] == "fit" and r["status"] == "accepted"} == {"hospital_a"}
    marker = json.loads((run / "run.json").read_text())
    assert marker["status"] == "complete" and marker["model"] == "MONAI Bundle 'server-bundle'"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m["site"] == "hospital_a" and m["metric"] == "dice" for m in metrics)
    assert not (same / "models").exists() and not (same / "eval").exists()  # nothing written into the bundle
