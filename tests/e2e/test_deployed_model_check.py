"""Code never travels, in a real deployment (one server and three site processes): with
``model: {import: "mfpkg.nets:build"}``, a site whose Python path lacks the package refuses
the job naming the module, and a site with another version of it (a larger head) is left out
before round 1, naming the first entry that differs; the run goes on with the site that
built the server's model (the quorum is one site)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from deploy_kits import make_kits, start, stop
from e2e.test_deployment import _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NETS = '''
    import torch.nn as nn


    def build(in_channels, out_channels):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), {head})
'''
HEAD_V1 = "nn.Linear(4, out_channels)"
HEAD_V2 = "nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out_channels)"  # "2.0": a hidden layer in the head


def _package(folder: Path, head: str) -> Path:
    """A folder holding package ``mfpkg`` whose ``nets.build`` ends with ``head``."""
    pkg = folder / "mfpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS.format(head=head)))
    return folder


def _env(path: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | ({"PYTHONPATH": str(path)} if path is not None else {})


def test_sites_without_the_code_or_with_another_version_are_refused_before_round_1(tmp_path):
    v1, v2 = _package(tmp_path / "v1", HEAD_V1), _package(tmp_path / "v2", HEAD_V2)
    job = _small(tmp_path, "deployed", rounds=1, compare=[], min_sites=1, model={"import": "mfpkg.nets:build"})
    raw = yaml.safe_load(job.read_text())
    for site in raw["data"]["sites"]:  # tiny sites: the check, not the training, is under test
        site.update(n_train=40, n_val=10, n_test=10)
    job.write_text(yaml.safe_dump(raw))
    kits, port = make_kits(tmp_path)
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log", env=_env(v1))
    paths = {"hospital_a": v1, "hospital_b": None, "hospital_c": v2}
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "60"], tmp_path / f"{s}.log", env=_env(p))
             for s, p in paths.items()}
    try:
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert sites["hospital_a"].wait(timeout=30) == 0, (tmp_path / "hospital_a.log").read_text()[-2000:]
        assert sites["hospital_b"].wait(timeout=30) != 0
        assert sites["hospital_c"].wait(timeout=30) != 0
    finally:
        stop(server, *sites.values())
    run = tmp_path / "deployed"
    log = " ".join((run / "run.log").read_text().split())
    # the site without the package said why, naming the module; the server did not wait for it
    missing = "no module named 'mfpkg.nets' here (missing: 'mfpkg')"
    assert f"site 'hospital_b' cannot take part in the job: ConfigError: model.import: {missing}" in log
    assert "starting without site(s) hospital_b, which cannot take part in the job (see above)" in log
    assert missing in " ".join((tmp_path / "hospital_b.log").read_text().split())
    # the site with the other version: left out, the first differing entry named
    assert ("site 'hospital_c' is left out of the run: it built a different model: entry '4.weight' has shape "
            "(8, 4) there and (1, 4) here (3 more differences") in log
    assert "another version of 'mfpkg.nets:build'" in log
    assert "left out of the run: it built a different model" in " ".join(
        (tmp_path / "hospital_c.log").read_text().split())
    audit = json.loads((run / "audit.json").read_text())["rows"]
    # (the round loop still draws every training site; those not connected fail at once)
    assert {r["site"] for r in audit if r["kind"] == "fit" and r["status"] == "accepted"} == {"hospital_a"}
    assert any(r["site"] == "hospital_b" and r["status"] == "failed" and "mfpkg" in r["reason"] for r in audit)
    assert any(r["site"] == "hospital_c" and "different model" in r["reason"] for r in audit)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
