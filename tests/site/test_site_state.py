"""A site's algorithm state across rounds (site/state.py): a round the server redoes after a
crash starts from the state the uninterrupted run had, and a site process started again
takes its state up from its state file; every stateful algorithm, bit for bit."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from medfed.config import parse_job
from medfed.core import codec
from medfed.core.errors import SiteError
from medfed.core.types import Arm
from medfed.data.sites import build_sites
from medfed.models import build_model, get_params
from medfed.server.loop import make_plan
from medfed.site.app import SiteApp
from medfed.site.state import StateFile

RAW = {
    "name": "state", "output": "o", "rounds": 3, "threads": 1,
    "data": {"source": "synthetic", "image_size": 16,
             "sites": [{"name": "a", "n_train": 24, "n_val": 8, "n_test": 6},
                       {"name": "b", "n_train": 16, "n_val": 8, "n_test": 6}]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05, "local_epochs": 1, "momentum": 0.0},
}

# every algorithm that keeps state at the site, and compression's error feedback
STATEFUL = {
    "scaffold": {"algorithm": {"name": "scaffold"}},
    "feddyn": {"algorithm": {"name": "feddyn", "alpha": 0.1}},
    "moon": {"algorithm": {"name": "moon", "mu": 1.0}},
    "ditto": {"algorithm": {"name": "ditto", "lam": 0.1}},
    "fedce": {"algorithm": {"name": "fedce"}},
    "fedbn": {"algorithm": {"name": "fedbn"}},
    "fedper": {"algorithm": {"name": "fedper", "personal_layers": ["head"]}},
    "fedrep": {"algorithm": {"name": "fedrep", "personal_layers": ["head"]}},
    "topk_error_feedback": {"compression": {"method": "topk", "fraction": 0.1}},
}


def _job(over):
    return parse_job({**copy.deepcopy(RAW), **over})


def _app(job, file=None):
    app = SiteApp(build_sites(job)[0], job, torch.device("cpu"))
    if file is not None:
        app.keep_state_in(file)
    return app


def _init(job):
    torch.manual_seed(0)
    return get_params(build_model(job.model, job.task, 1))


def _fit(app, job, params, rnd):
    return app.fit(params, make_plan(job, "j", Arm.FEDERATED, rnd, 0))


def _moved(params, rnd):
    """A stand-in for the global model of round ``rnd`` (what the server would send)."""
    g = torch.Generator().manual_seed(rnd)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in params.items()}


def _equal(x, y):
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def _same(a, b, app=None, state=None):
    """Two answers the same bit for bit, and (when given) ``app``'s state equal to ``state``."""
    assert a.state_round == b.state_round
    _equal(a.params, b.params)
    _equal(a.extras, b.extras)
    if app is not None:
        _equal(app._snapshot(), state)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_redone_round_and_a_restarted_site_train_as_the_uninterrupted_site(name, tmp_path):
    job = _job(STATEFUL[name])
    init = _init(job)
    p1, p2, p3 = init, _moved(init, 2), _moved(init, 3)

    straight = _app(job)
    assert straight.states is not None, "the algorithm keeps state at the site"
    u1 = _fit(straight, job, p1, 1)
    s1 = straight._snapshot()
    u2 = _fit(straight, job, p2, 2)
    s2 = straight._snapshot()
    u3 = _fit(straight, job, p3, 3)
    s3 = straight._snapshot()
    assert (u1.state_round, u2.state_round, u3.state_round) == (0, 1, 2)
    assert s1 and s2.keys() == s1.keys() and any(not torch.equal(s1[k], s2[k]) for k in s1), "state moves"

    # the server crashed after the site trained round 2 and, resumed, asks for round 2 again
    redo = _app(job, StateFile(tmp_path / "a.safetensors", job.job_hash(), "a"))
    _same(_fit(redo, job, p1, 1), u1, redo, s1)
    _same(_fit(redo, job, p2, 2), u2, redo, s2)
    _same(_fit(redo, job, p2, 2), u2, redo, s2)
    _same(_fit(redo, job, p3, 3), u3, redo, s3)

    # the site process killed after round 2 and started again: its file has both copies
    killed = _app(job, StateFile(tmp_path / "k.safetensors", job.job_hash(), "a"))
    _fit(killed, job, p1, 1)
    _fit(killed, job, p2, 2)
    shutil.copyfile(tmp_path / "k.safetensors", tmp_path / "k2.safetensors")
    restarted = _app(job, StateFile(tmp_path / "k.safetensors", job.job_hash(), "a"))
    assert restarted.states.round == 2
    _same(_fit(restarted, job, p3, 3), u3, restarted, s3)
    # ... and when the server redoes round 2 after the restart, the earlier copy serves
    back = _app(job, StateFile(tmp_path / "k2.safetensors", job.job_hash(), "a"))
    _same(_fit(back, job, p2, 2), u2, back, s2)


@pytest.mark.parametrize("name", ["scaffold", "ditto"])
def test_without_its_state_a_site_trains_differently(name):
    """The property above is not trivial: a site that lost its state answers otherwise."""
    job = _job(STATEFUL[name])
    init = _init(job)
    straight = _app(job)
    _fit(straight, job, init, 1)
    u2 = _fit(straight, job, _moved(init, 2), 2)
    kept = straight._snapshot()
    fresh = _app(job)
    lost = _fit(fresh, job, _moved(init, 2), 2)
    assert lost.state_round == 0 and u2.state_round == 1
    differs = fresh._snapshot()
    assert any(not torch.equal(kept[k], differs[k]) for k in kept)


def test_stateless_algorithms_keep_nothing_and_send_no_state_round(tmp_path):
    job = _job({"algorithm": {"name": "fedprox", "mu": 0.1}})
    file = StateFile(tmp_path / "s.safetensors", job.job_hash(), "a")
    app = _app(job, file)
    assert app.states is None
    u = _fit(app, job, _init(job), 1)
    assert u.state_round is None and not file.path.exists()
    assert codec.decode_update(bytes(codec.encode_update(u))).state_round is None


def test_the_state_round_travels_and_a_bad_one_is_refused():
    job = _job(STATEFUL["scaffold"])
    app = _app(job)
    init = _init(job)
    _fit(app, job, init, 1)
    u = _fit(app, job, init, 2)
    assert codec.decode_update(bytes(codec.encode_update(u))).state_round == 1
    from dataclasses import replace

    from medfed.core.errors import CodecError

    for bad in (-1, True):
        blob = codec.encode_update(replace(u, state_round=bad))
        with pytest.raises(CodecError, match="state_round"):
            codec.decode_update(bytes(blob))


def test_a_failed_round_leaves_the_state_as_it_was(tmp_path):
    job = _job(STATEFUL["scaffold"])
    app = _app(job)
    init = _init(job)
    _fit(app, job, init, 1)
    before = app._snapshot()
    broken = {k: v[..., :1] if v.dim() else v for k, v in init.items()}  # does not fit the model
    with pytest.raises(SiteError):
        _fit(app, job, broken, 2)
    after = app._snapshot()
    assert app.states.round == 1 and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_files_of_another_job_or_site_or_damaged_are_not_used(tmp_path, caplog):
    job = _job(STATEFUL["scaffold"])
    init = _init(job)
    path = tmp_path / "s.safetensors"
    app = _app(job, StateFile(path, job.job_hash(), "a"))
    _fit(app, job, init, 1)
    assert path.stat().st_mode & 0o077 == 0  # the site's user only

    other = _job({**STATEFUL["scaffold"], "seed": 7})
    with pytest.raises(ValueError, match="belongs to job"):
        StateFile(path, other.job_hash(), "a").load()
    with pytest.raises(ValueError, match="belongs to job"):
        StateFile(path, job.job_hash(), "b").load()
    path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="medfed"):
        fresh = _app(job, StateFile(path, job.job_hash(), "a"))
    assert fresh.states.round == 0 and "cannot be used" in caplog.text and "afresh" in caplog.text
