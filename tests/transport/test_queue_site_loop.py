"""A site against a queue server (client.serve_tasks with join replies that name the queue's
run): idle joins count as contact, a job the site cannot take is declined and the next one
taken, each run set up by a fresh site, and the site does not stop when a job is done."""

from __future__ import annotations

import grpc
import pytest

from medfed.core.errors import ConfigError
from medfed.transport.grpc import client
from medfed.transport.grpc.client import serve_tasks


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "failed to connect to all addresses"


class _Stop(Exception):
    """Ends the scripted server: a queue site never returns on its own."""


class _QueueServer:
    """A connection whose joins follow ``script``: "idle", or (job name, run) for a job."""

    site, target, reconnect_max = "hospital_a", "server:1", 1.0

    def __init__(self, script):
        self.script = list(script)
        self.refused, self.readied, self.polls = [], [], 0
        self.now = 0.0  # the clock the site reads

    def join(self):
        if not self.script:
            raise _Stop()
        step = self.script.pop(0)
        if step == "idle":  # the queue stays empty a long while
            self.now += 1000.0
            return {"idle": True, "queue": {}, "medfed_version": client.__version__}
        if step == "away":  # the server is briefly unreachable
            raise _Unavailable()
        name, run = step
        return {"job_id": name, "job": {"name": name}, "queue": {"run": run, "resumed": False},
                "medfed_version": client.__version__}

    def ready(self, job_id, summary):
        self.readied.append(job_id)

    def refuse_job(self, job_id, cause):
        self.refused.append((job_id, cause))

    def poll(self, job_id, round_timeout):
        self.polls += 1
        return {"kind": "done"}, None


def test_a_queue_site_takes_job_after_job_and_declines_what_it_cannot_take(monkeypatch):
    conn = _QueueServer(["idle", "idle", "away", ("forbidden", "0001"), "idle", ("a", "0002"), ("a", "0003"), "idle",
                         "away"])
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    monkeypatch.setattr(client.time, "monotonic", lambda: conn.now)
    monkeypatch.setattr(conn, "wait_connected", lambda timeout: False, raising=False)
    runs, set_up, done = [], [], []

    def setup(job, job_id):
        set_up.append(job_id)
        if job["name"] == "forbidden":
            raise ConfigError("policy: algorithm fedprox is not allowed here")
        return {}, 60.0

    with pytest.raises(_Stop):
        serve_tasks(conn, setup, lambda h, b: ("fit", b""), give_up_after=1.0,
                    new_run=lambda run, resumed: runs.append((run, resumed)), job_done=lambda: done.append(1))
    # idle joins are contact: after 1000 s of an empty queue, the server away for a moment is not given up on
    assert runs == [("0001", False), ("0002", False), ("0003", False)]  # a fresh site for every run
    assert set_up == ["forbidden", "a", "a"]  # the same job submitted again is set up again
    assert conn.refused and conn.refused[0][0] == "forbidden" and "not allowed" in conn.refused[0][1]
    assert conn.readied == ["a", "a"] and len(done) == 2


def test_a_site_of_a_one_job_server_still_stops_when_its_setup_fails():
    conn = _QueueServer([("forbidden", None)])
    conn.join = lambda: {"job_id": "forbidden", "job": {"name": "forbidden"}, "medfed_version": client.__version__}

    def setup(job, job_id):
        raise ConfigError("policy: no")

    with pytest.raises(ConfigError, match="policy: no"):
        serve_tasks(conn, setup, lambda h, b: ("fit", b""))
    assert conn.refused
