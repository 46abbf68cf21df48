"""``model.init`` and ``model.freeze`` in a real deployment: the server reads the init file
and sends the weights (the sites never see the file nor its path), and the deployed model
equals the simulated one bit for bit."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from e2e.test_deployment import _deploy, _same, _simulate, _small
from safetensors.torch import load_file, save_file

from medfed.config import ModelConfig, TaskConfig
from medfed.models import build_model, get_params

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_deployment_starts_from_the_servers_init_file_with_frozen_layers(tmp_path):
    torch.manual_seed(77)  # weights no job seed would draw
    pretrained = get_params(build_model(ModelConfig(name="small_cnn", width=16), TaskConfig(labels="binary"), 1))
    init = tmp_path / "server-only" / "pretrained.safetensors"
    init.parent.mkdir()
    save_file(pretrained, str(init))
    model = {"name": "small_cnn", "width": 16, "init": str(init), "freeze": ["features.0."]}
    job = _small(tmp_path, "deployed", rounds=2, compare=["local"], model=model)
    run = _deploy(tmp_path, job)
    deployed = load_file(str(run / "model_final.safetensors"))
    assert _same(deployed, _simulate(job, tmp_path))
    frozen = ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias"]
    assert all(torch.equal(deployed[k], pretrained[k]) for k in frozen)
    assert not torch.equal(deployed["head.weight"], pretrained["head.weight"])
    marker = json.loads((run / "run.json").read_text())
    assert marker["init_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    for site_log in ("hospital_a.log", "hospital_b.log", "hospital_c.log"):  # the path stays at the server
        assert "server-only" not in (tmp_path / site_log).read_text()
