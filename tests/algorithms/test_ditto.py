import copy

import torch

from medfed.config import parse_job
from medfed.core.types import Arm, Split
from medfed.data.sites import build_sites
from medfed.models import build_model, get_params
from medfed.server.loop import make_plan
from medfed.site.app import SiteApp

RAW = {
    "name": "ditto", "output": "o", "rounds": 1, "threads": 1, "algorithm": {"name": "ditto", "lam": 0.0},
    "data": {"source": "synthetic", "image_size": 16, "sites": [{"name": "a", "n_train": 24, "n_val": 4, "n_test": 6}]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    "train": {"batch_size": 4, "lr": 0.05, "local_epochs": 2},
}


def _site(lam):
    job = parse_job({**copy.deepcopy(RAW), "algorithm": {"name": "ditto", "lam": lam}})
    torch.manual_seed(0)
    init = get_params(build_model(job.model, job.task, 1))
    app = SiteApp(build_sites(job)[0], job, torch.device("cpu"))
    return job, init, app


def _dist(a, b, keys):
    return sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in keys)


def test_personal_model_stays_at_the_site_and_is_what_personalized_evaluates():
    job, init, app = _site(0.1)
    up = app.fit(init, make_plan(job, "j", Arm.FEDERATED, 1, 0))
    personal = app._hooks[Arm.FEDERATED].personal
    assert personal is not None and personal.keys() == up.params.keys()
    assert any(not torch.equal(personal[k], up.params[k]) for k in personal)  # a second, separate model
    app.evaluate(init, (Split.TEST,), Arm.PERSONALIZED)
    state = app.model.state_dict()
    assert all(torch.equal(state[k], personal[k]) for k in personal)


def test_with_lam_zero_the_personal_model_is_plain_local_training_and_a_large_lam_pulls_it_home():
    job, init, app = _site(0.0)
    up = app.fit(init, make_plan(job, "j", Arm.FEDERATED, 1, 0))
    plain = app._hooks[Arm.FEDERATED].personal
    names = [n for n, _ in app.model.named_parameters()]
    # lam = 0, first round: both trainings start from the global model with the same seed
    assert all(torch.equal(plain[k], up.params[k]) for k in names)
    job, init, app = _site(50.0)
    app.fit(init, make_plan(job, "j", Arm.FEDERATED, 1, 0))
    pulled = app._hooks[Arm.FEDERATED].personal
    assert _dist(pulled, init, names) < _dist(plain, init, names)
