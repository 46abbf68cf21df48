"""The process-pool transport with real worker processes (spawned: a few seconds)."""

import pytest
import torch

from medfed.config import parse_job
from medfed.core.types import Arm, EvalRequest, FitRequest, SiteFailure, Split, Update
from medfed.data.sites import build_sites
from medfed.server.loop import make_plan
from medfed.models import get_params
from medfed.server.runner import initial_model
from medfed.site.app import build_site_apps
from medfed.transport.inprocess import InProcessTransport
from medfed.transport.pool import PoolTransport

JOB = parse_job({
    "name": "pool", "output": "o", "rounds": 1, "threads": 2, "workers": 2, "transport": "pool",
    "data": {"source": "synthetic", "image_size": 16, "sites": [
        {"name": "a", "n_train": 20, "n_val": 4, "n_test": 6},
        {"name": "b", "n_train": 12, "n_val": 4, "n_test": 6},
        {"name": "c", "n_train": 8, "n_val": 4, "n_test": 6},
    ]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"}, "train": {"batch_size": 4},
})


@pytest.fixture(scope="module")
def pool():
    with PoolTransport(JOB) as t:
        yield t


def _requests(sites=("a", "b", "c")):
    init = get_params(initial_model(JOB, 1))
    return init, [FitRequest(s, init, make_plan(JOB, "job", Arm.FEDERATED, 1, i)) for i, s in enumerate(sites)]


def test_pool_matches_inprocess(pool):
    init, reqs = _requests()
    got = pool.fit(reqs, timeout=120)
    torch.set_num_threads(1)  # workers run with 2 // 2 = 1 thread each
    ref = InProcessTransport(build_site_apps(JOB, build_sites(JOB), torch.device("cpu"))).fit(reqs, timeout=120)
    torch.set_num_threads(2)
    assert [u.site for u in got] == ["a", "b", "c"]
    for u, r in zip(got, ref):
        assert isinstance(u, Update) and u.num_examples == r.num_examples and u.num_steps == r.num_steps
        for k in r.params:
            assert torch.allclose(u.params[k].float(), r.params[k].float(), atol=1e-5), k
    evals = pool.evaluate([EvalRequest("b", init, (Split.TEST,), "j", 1)], timeout=120)
    assert evals[0][0].split is Split.TEST and evals[0][0].num_examples == 6


def test_unknown_site_and_bad_params_are_failures_not_crashes(pool):
    init, reqs = _requests(("a",))
    bad = FitRequest("a", {"nonsense": torch.ones(1)}, reqs[0].plan)
    ghost = FitRequest("zz", init, reqs[0].plan)
    out = pool.fit([bad, ghost], timeout=120)
    assert isinstance(out[0], SiteFailure) and "parameters do not fit the model" in out[0].cause
    assert isinstance(out[1], SiteFailure) and out[1].cause == "unknown site"


def test_a_site_past_the_deadline_is_a_failure_and_the_pool_recovers(pool):
    _, reqs = _requests(("a", "b"))
    out = pool.fit(reqs, timeout=0.001)
    assert all(isinstance(o, SiteFailure) and "no answer within round_timeout" in o.cause for o in out)
    out = pool.fit(reqs, timeout=120)  # workers were restarted
    assert all(isinstance(o, Update) for o in out)


def test_a_replaced_worker_takes_its_sites_algorithm_state_up_from_their_files(tmp_path):
    raw = JOB.model_dump(mode="json")
    job = parse_job({**raw, "algorithm": {"name": "scaffold"}, "train": {**raw["train"], "momentum": 0.0}})
    init = get_params(initial_model(job, 1))
    with PoolTransport(job, workers=1, state_dir=tmp_path) as t:
        first = t.fit([FitRequest("a", init, make_plan(job, "job", Arm.FEDERATED, 1, 0))], timeout=120)[0]
        assert isinstance(first, Update) and first.state_round == 0
        t._kill(0)  # the worker is gone; the next task starts a new one
        second = t.fit([FitRequest("a", init, make_plan(job, "job", Arm.FEDERATED, 2, 0))], timeout=120)[0]
    assert isinstance(second, Update) and second.state_round == 1, "the new worker took up round 1's state"
    assert list(tmp_path.glob("site-*.safetensors"))
