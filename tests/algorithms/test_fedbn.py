import copy

import pytest
import torch

from medfed.algorithms import build_algorithm
from medfed.algorithms.base import norm_keys
from medfed.config import FedBNConfig, parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, Split, Update
from medfed.data.sites import build_sites
from medfed.models import get_params
from medfed.server.loop import make_plan
from medfed.server.runner import initial_model
from medfed.server.validate import full_spec, update_problem
from medfed.site.app import SiteApp

JOB = parse_job({
    "name": "bn", "output": "o", "rounds": 2, "threads": 1, "algorithm": {"name": "fedbn"},
    "data": {"source": "synthetic", "image_size": 16, "sites": [
        {"name": "a", "n_train": 16, "n_val": 4, "n_test": 6},
        {"name": "b", "n_train": 16, "n_val": 4, "n_test": 6, "scanner": {"intensity_scale": 2.0}},
    ]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"}, "train": {"batch_size": 4},
})


@pytest.fixture()
def setup():
    model = initial_model(JOB, 1)
    bn = norm_keys(model)
    app = SiteApp(build_sites(JOB)[1], JOB, torch.device("cpu"))
    return get_params(model), bn, app


def test_bn_keys_cover_every_batch_norm_entry(setup):
    init, bn, _ = setup
    assert bn == {k for k in init if k.startswith("features.") and k.split(".")[2] == "1"}  # block[1] is the BN
    assert "features.0.1.running_mean" in bn and "features.0.1.num_batches_tracked" in bn
    assert "features.0.0.weight" not in bn and "head.weight" not in bn


def test_site_never_sends_and_never_takes_bn(setup):
    init, bn, app = setup
    up = app.fit(init, make_plan(JOB, "j", Arm.FEDERATED, 1, 1))
    assert not (up.params.keys() & bn) and up.params.keys() == init.keys() - bn
    kept = {k: v.clone() for k, v in app._kept.items()}
    # the server's BN entries are ignored: poison them and the site's own stay in place
    poisoned = {k: (v.float() * float("nan")).to(v.dtype) if k in bn else v for k, v in init.items()}
    app.evaluate(poisoned, (Split.TEST,), Arm.FEDERATED)
    state = app.model.state_dict()
    assert all(torch.equal(state[k], kept[k]) for k in bn)
    # a baseline arm loads exactly what it is given
    app.evaluate(init, (Split.TEST,), Arm.LOCAL)
    assert torch.equal(app.model.state_dict()["features.0.1.running_mean"], init["features.0.1.running_mean"])


def test_server_averages_shared_layers_and_keeps_its_bn_entries(setup):
    init, bn, _ = setup
    algo = build_algorithm(JOB.algorithm, initial_model(JOB, 1), 2)
    shared = {k: v for k, v in init.items() if k not in bn}
    ups = [Update("a", 1, {k: v + 1 if v.is_floating_point() else v for k, v in shared.items()}, 1, 1),
           Update("b", 1, {k: v + 3 if v.is_floating_point() else v for k, v in shared.items()}, 3, 1)]
    out = algo.aggregate(init, ups)
    assert out.keys() == init.keys()
    assert torch.allclose(out["head.weight"], init["head.weight"] + 2.5)
    assert all(torch.equal(out[k], init[k]) for k in bn)
    assert update_problem(ups[0], full_spec(init, algo.local_keys), 1) is None
    leaked = Update("a", 1, init, 1, 1)
    assert "unexpected" in update_problem(leaked, full_spec(init, algo.local_keys), 1)


def test_fedbn_on_a_model_without_batch_norm_is_an_error():
    with pytest.raises(ConfigError, match="algorithm.name: 'fedbn' keeps batch-norm layers local"):
        build_algorithm(FedBNConfig(name="fedbn"), torch.nn.Linear(3, 1), 2)


def test_fedbn_job_runs_and_sites_keep_their_own_statistics(tmp_path):
    from medfed.server.runner import run_job

    job = parse_job({**copy.deepcopy(JOB.model_dump(mode="json")), "output": str(tmp_path / "run")})
    run_job(job)
    assert (tmp_path / "run" / "report.html").is_file()
    assert "left out" not in (tmp_path / "run" / "run.log").read_text()
