"""transport: ray on a local Ray instance, against transport: inprocess: the same job and
seed give the same metrics and the same final model, bit for bit (CPU). Skipped when Ray,
the optional extra, is not installed. About 95 s on a 2-core machine, most of it Ray's
start-up and its actors' (each imports torch and MONAI and builds its sites' data): the
tests after the first share one instance of 2 CPUs."""

from __future__ import annotations

import logging
import time

import pytest

ray = pytest.importorskip("ray", reason='transport: ray needs the optional extra: pip install -e ".[ray]"')

from medfed.config import parse_job  # noqa: E402
from medfed.core.types import Arm, FitRequest, SiteFailure, Update  # noqa: E402
from medfed.models import get_params  # noqa: E402
from medfed.server import runner  # noqa: E402
from medfed.server.loop import make_plan  # noqa: E402
from medfed.server.runner import initial_model  # noqa: E402
from medfed.transport.ray import RayTransport  # noqa: E402
from medfed.transport.spool import ENVIRONMENT, Spool  # noqa: E402
from ray_jobs import assert_same, job_dict, read_run, run  # noqa: E402


def test_a_local_instance_started_for_the_run_equals_inprocess(tmp_path):
    # address null: the run starts Ray with `threads` CPUs (1 here: one actor serves every
    # site and the pooled pseudo-site) and stops it at the end
    assert not ray.is_initialized()
    ref = run(tmp_path / "inprocess")
    got = run(tmp_path / "ray", transport="ray")
    assert not ray.is_initialized()
    assert_same(ref, got)
    sites = (tmp_path / "ray" / "sites.json").read_text()
    assert sites == (tmp_path / "inprocess" / "sites.json").read_text()  # described by the actors


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance of 2 CPUs for the tests below: found running, the transport joins
    it (two actors of 1 CPU: a and c on one, b on the other) and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.mark.parametrize("algorithm", [{"name": "scaffold"}, {"name": "ditto", "lam": 0.1}])
def test_site_state_lives_in_the_actors_and_the_run_equals_inprocess(tmp_path, local_ray, algorithm, monkeypatch):
    # SCAFFOLD's control variates and Ditto's personal models stay in the actors between rounds
    over = {"algorithm": algorithm, "train": {"batch_size": 4, "optimizer": "sgd", "momentum": 0}, "compare": []}
    ref = run(tmp_path / "inprocess", **over)
    written = []
    if algorithm["name"] == "scaffold":  # every update on Ray kept on disk (transport/spool.py): the same run
        monkeypatch.setenv(ENVIRONMENT, "0")
        to_file = Spool._to_file
        monkeypatch.setattr(Spool, "_to_file", lambda self, blob: written.append(1) or to_file(self, blob))
    got = run(tmp_path / "ray", transport="ray", ray={"max_concurrent": 2}, **over)
    assert len(written) == (6 if algorithm["name"] == "scaffold" else 0)  # 3 sites, 2 rounds
    assert_same(ref, got)
    if algorithm["name"] == "ditto":
        assert any(r["arm"] == "personalized" for r in got[0])


def test_a_killed_actor_is_restarted_its_state_loss_logged_and_the_run_completes(tmp_path, local_ray, monkeypatch):
    made = []

    def recording(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    make = runner.make_transport
    monkeypatch.setattr(runner, "make_transport", recording)

    def kill_after_round_1(s, _params):
        if s.arm is Arm.FEDERATED and s.round == 1:
            actor = made[-1]._actors[1]  # serves site b
            before = ray.get(actor.describe.remote(), timeout=60)[2]
            ray.kill(actor, no_restart=False)  # as if its process had died: Ray restarts it
            for _ in range(240):  # until the new actor has built b's data again
                try:
                    if ray.get(actor.describe.remote(), timeout=60)[2] != before:
                        return
                except ray.exceptions.RayActorError:
                    time.sleep(0.25)

    ref = run(tmp_path / "inprocess", compare=[])
    runner.run_job(parse_job(job_dict(tmp_path / "ray", transport="ray", compare=[])), on_round=kill_after_round_1)
    log = (tmp_path / "ray" / "run.log").read_text()
    assert "the actor of site(s) ['b'] was restarted" in log and "was lost" in log
    # FedAvg keeps nothing at a site between rounds: the rebuilt site trains as before
    assert_same(ref, read_run(tmp_path / "ray"))


def _requests(job, sites=("a", "b", "c")):
    init = get_params(initial_model(job, 1))
    return [FitRequest(s, init, make_plan(job, job.job_id, Arm.FEDERATED, 1, i)) for i, s in enumerate(sites)]


def test_a_site_past_the_deadline_is_a_failure_and_its_actor_recovers(tmp_path, local_ray, caplog):
    job = parse_job(job_dict(tmp_path / "o", transport="ray"))
    with RayTransport(job) as transport:
        assert [s.name for s in transport.summaries(120)] == ["a", "b", "c"]
        reqs = _requests(job)
        out = transport.fit(reqs, timeout=0.001)  # two actors: a and b start, c waits behind a
        assert [o.cause for o in out] == ["no answer within round_timeout=0.001s"] * 2 + [
            "not started within round_timeout=0.001s (at most 2 site tasks run at once: ray.max_concurrent, or the "
            "actors the cluster holds)"]
        ghost = FitRequest("zz", reqs[0].params, reqs[0].plan)
        with caplog.at_level(logging.WARNING, logger="medfed"):
            out = transport.fit([*reqs, ghost], timeout=120)  # the stalled actors were restarted
        assert [type(o) for o in out] == [Update, Update, Update, SiteFailure] and out[3].cause == "unknown site"
        assert [u.site for u in out[:3]] == ["a", "b", "c"]
        assert "the actor of site(s) ['a', 'c'] was restarted" in caplog.text
        ray.kill(transport._actors[1], no_restart=False)  # b's process dies just before a round
        with caplog.at_level(logging.WARNING, logger="medfed"):
            out = transport.fit(reqs, timeout=120)  # b's task waits for (or is sent again to) the restarted actor
        assert [type(o) for o in out] == [Update, Update, Update]
        assert "the actor of site(s) ['b'] was restarted" in caplog.text
    assert ray.is_initialized()  # a Ray found running is left running


def test_segmentation_masks_are_predicted_by_the_actors_as_in_process(tmp_path, local_ray):
    # the test images stay in the actors: they draw the predicted masks the run folder keeps
    seg = {"data": {"source": "synthetic_segmentation", "dims": 2, "image_size": 16, "sites": [
               {"name": "a", "n_train": 8, "n_test": 3}, {"name": "b", "n_train": 6, "n_test": 3}]},
           "model": {"name": "unet", "width": 4}, "task": {"kind": "segmentation", "num_classes": 2, "hd95": False,
                                                            "save_predictions": 2},
           "rounds": 1, "compare": []}
    ref = run(tmp_path / "inprocess", **seg)
    got = run(tmp_path / "ray", transport="ray", **seg)
    assert_same(ref, got)

    def masks(run_dir):
        return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "predictions").rglob("*.png"))}

    want = masks(tmp_path / "inprocess")
    assert len(want) == 4 and masks(tmp_path / "ray") == want
