"""A reconstruction job deployed on 127.0.0.1 (a server and three site processes): the
same metrics as its simulation, the zero-filled input scored as an arm of its own."""

from __future__ import annotations

import json

import pytest
import yaml

from deploy_kits import SITES, make_kits, start, stop
from test_relayed_deployment import _metrics, _simulated

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_deployed_reconstruction_scores_the_zero_filled_input_as_its_simulation_does(tmp_path):
    kits, port = make_kits(tmp_path)
    job = tmp_path / "recon.yaml"
    job.write_text(yaml.safe_dump({
        "name": "recon", "seed": 3, "output": str(tmp_path / "deployed"), "rounds": 2, "threads": 1,
        "round_timeout": 60, "compare": [],
        "data": {"source": "synthetic_phantoms", "image_size": 32, "sites": [
            {"name": s, "n_train": 8, "n_val": 4, "n_test": 4, **({"acceleration": 8} if s == SITES[2] else {})}
            for s in SITES]},
        "model": {"name": "unet", "width": 4}, "task": {"kind": "reconstruction"},
    }))
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "120"], tmp_path / f"{s}.log")
             for s in SITES}
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values())
    deployed = _metrics(tmp_path / "deployed")
    zero = {k: v for k, v in deployed.items() if k[1] == "zero_filled"}
    assert {k[2] for k in zero} >= set(SITES) and {k[4] for k in zero} >= {"psnr", "ssim"}
    assert deployed == _simulated(job, tmp_path)
    assert "zero_filled" in json.dumps(sorted(deployed))
