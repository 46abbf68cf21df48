"""The job queue of a queue server (server/queue.py, server/queue_server.py), in-process:
submit, list, show, abort; what a restarted server finds; a job that crashes is marked failed
and the next one runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medfed.config import builtin_job_path
from medfed.core.errors import ConfigError, MedfedError, RoundError
from medfed.server import queue_server
from medfed.server.queue import JobAborted, JobQueue, JobStatus, UnknownJob


def _text(name: str = "q", **over) -> str:
    raw = yaml.safe_load(builtin_job_path("quickstart").read_text())
    raw["data"]["image_size"] = 16
    raw.update({"name": name, "rounds": 2, "compare": [], "model": {"name": "small_cnn", "width": 4}, **over})
    return yaml.safe_dump(raw)


def test_submit_list_show_and_abort_a_queued_job(tmp_path):
    q = JobQueue(tmp_path / "runs")
    a = q.submit(_text("a"), "a.yaml", "admin")
    b = q.submit(_text("b"), "b.yaml", "admin")
    assert (a.id, b.id) == ("0001", "0002") and a.status is JobStatus.QUEUED
    assert a.run_dir == str((tmp_path / "runs" / "0001").resolve()) and a.rounds == 2
    assert q.load(a.id).output == (tmp_path / "runs" / "0001").resolve()  # the job's own output is not used
    assert [j.id for j in q.jobs()] == ["0001", "0002"]
    dropped = q.abort(a.id, "ops")
    assert dropped.status is JobStatus.ABORTED and "ops" in dropped.error
    assert q.take(0.0).id == b.id  # the aborted job never runs: the next one does
    assert q.take(0.0) is None
    with pytest.raises(UnknownJob, match=r"no job '0042'.*0001, 0002.*medfed jobs list"):
        q.get("0042")
    with pytest.raises(MedfedError, match=r"job 0001 has ended \(aborted\)"):
        q.abort(a.id, "ops")
    # the queue file is what a restarted server reads
    saved = json.loads((tmp_path / "runs" / "queue.json").read_text())
    assert [(j["id"], j["status"]) for j in saved["jobs"]] == [("0001", "aborted"), ("0002", "running")]


def test_a_bad_job_is_refused_with_the_config_error_and_leaves_nothing(tmp_path):
    q = JobQueue(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"(?s)job 0001 \(bad.yaml\).*rounds: must be >= 1"):
        q.submit(_text(rounds=0), "bad.yaml", "admin")
    with pytest.raises(ConfigError, match=r"attack: simulated attacks are for simulation studies"):
        q.submit(_text(attack={"kind": "sign_flip", "fraction": 0.3}), "attack.yaml", "admin")
    assert q.jobs() == [] and not list((tmp_path / "runs" / "queue").iterdir())
    assert q.submit(_text(), "ok.yaml", "admin").id == "0003"  # an id is never given twice
    q.max_sites = 2  # the server's threads
    with pytest.raises(ConfigError, match=r"names 3 sites; this queue server serves at most 2"):
        q.submit(_text(), "big.yaml", "admin")


def test_a_running_job_is_aborted_at_its_next_round(tmp_path):
    q = JobQueue(tmp_path / "runs")
    j = q.submit(_text(), "j.yaml", "admin")
    assert q.take(0.0).status is JobStatus.RUNNING
    q.progress(j.id, 1)
    assert q.abort(j.id, "ops").status is JobStatus.RUNNING  # not yet: at the round boundary
    with pytest.raises(JobAborted, match="aborted by admin 'ops' after round 2"):
        q.progress(j.id, 2)


def test_a_restarted_server_resumes_the_job_it_was_running(tmp_path):
    runs = tmp_path / "runs"
    q = JobQueue(runs)
    saved, fresh, done = (q.submit(_text(n), f"{n}.yaml", "admin") for n in ("saved", "fresh", "done"))
    for j in (saved, fresh, done):
        q.take(0.0)
    Path(saved.run_dir).mkdir()
    (Path(saved.run_dir) / "state.sqlite").write_bytes(b"")  # a round was saved
    Path(fresh.run_dir).mkdir()
    (Path(fresh.run_dir) / "run.log").write_text("started")  # stopped before its first round
    Path(done.run_dir).mkdir()
    (Path(done.run_dir) / "run.json").write_text("{}")  # finished, then killed before it was marked
    again = {j.id: j for j in JobQueue(runs).jobs()}
    assert (again[saved.id].status, again[saved.id].resumed) == (JobStatus.QUEUED, True)
    assert (again[fresh.id].status, again[fresh.id].resumed) == (JobStatus.QUEUED, False)
    assert not Path(fresh.run_dir).exists()  # nothing to resume: started again from an empty folder
    assert again[done.id].status is JobStatus.COMPLETE


def test_a_job_that_crashes_is_marked_failed_and_the_next_runs(tmp_path, monkeypatch):
    q = JobQueue(tmp_path / "runs")
    first = q.submit(_text("first"), "first.yaml", "admin")
    second = q.submit(_text("second"), "second.yaml", "admin")
    ran = []

    def serve_job(job, kit, resume, on_round, he_context, host):
        ran.append(job.name)
        if job.name == "first":
            raise ZeroDivisionError("a bug in the round loop")
        if job.name == "second":
            raise RoundError("only 1 training site(s) joined within 3 s; the quorum is 2")

    monkeypatch.setattr("medfed.server.deploy.serve_job", serve_job)

    class Host:
        run: dict = {}

    statuses = [queue_server.run_queued(q.take(0.0), q, None, Host(), None) for _ in range(2)]
    assert ran == ["first", "second"] and statuses == [JobStatus.FAILED, JobStatus.FAILED]
    jobs = {j.id: j for j in q.jobs()}
    assert "ZeroDivisionError: a bug in the round loop" in jobs[first.id].error
    assert jobs[second.id].error.startswith("only 1 training site(s) joined")


def test_an_abort_ends_the_running_jobs_wait_for_its_sites(tmp_path):
    import threading

    from medfed.transport.grpc.hub import Hub

    q = JobQueue(tmp_path / "runs")
    j = q.submit(_text(), "j.yaml", "admin")
    q.take(0.0)
    job = q.load(j.id)
    hub = Hub(job, job.job_id)
    q.on_abort = hub.interrupt  # as serve_queue wires it, through the dispatcher
    got = []
    waiting = threading.Thread(target=lambda: got.append(hub.wait_ready(list(job.site_names), 600.0)))
    waiting.start()
    q.abort(j.id, "ops")
    waiting.join(timeout=60)
    assert not waiting.is_alive() and got == [[]]  # no site joined: the job stops there (quorum not met)
