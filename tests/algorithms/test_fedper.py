import pytest
import torch

from medfed.algorithms import build_algorithm
from medfed.algorithms.fedper import layer_keys
from medfed.config import FedPerConfig, ModelConfig, TaskConfig, parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, Split
from medfed.data.sites import build_sites
from medfed.models import build_model, get_params
from medfed.server.loop import make_plan
from medfed.site.app import SiteApp


def _cnn():
    return build_model(ModelConfig(name="small_cnn", width=4), TaskConfig(labels="binary"), 1)


def test_personal_layer_keys_and_unknown_layer():
    assert layer_keys(_cnn(), ["head"]) == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match="algorithm.personal_layers: 'classifier' is not a layer of model 'SmallCNN'"):
        build_algorithm(FedPerConfig(name="fedper", personal_layers=["classifier"]), _cnn(), 2)


def test_site_keeps_its_head_and_shares_the_body():
    job = parse_job({
        "name": "per", "output": "o", "rounds": 1, "threads": 1,
        "algorithm": {"name": "fedper", "personal_layers": ["head"]},
        "data": {"source": "synthetic", "image_size": 16, "sites": [{"name": "a", "n_train": 16, "n_val": 4, "n_test": 4}]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"}, "train": {"batch_size": 4},
    })
    torch.manual_seed(0)
    init = get_params(build_model(job.model, job.task, 1))
    app = SiteApp(build_sites(job)[0], job, torch.device("cpu"))
    up = app.fit(init, make_plan(job, "j", Arm.FEDERATED, 1, 0))
    assert "head.weight" not in up.params and "features.0.0.weight" in up.params
    own_head = app._kept["head.weight"].clone()
    app.evaluate({**init, "head.weight": torch.zeros_like(own_head)}, (Split.TEST,), Arm.FEDERATED)
    assert torch.equal(app.model.state_dict()["head.weight"], own_head)
