"""A queue server (``medfed server --queue``) killed while it runs a job resumes that job,
after its last saved round, when it starts again; the site processes wait for it and take
the job up again without restarting."""

from __future__ import annotations

import json
import signal

import pytest

from deploy_kits import make_kits, start, stop, wait_for
from e2e.test_job_queue import TWO, _ended, queue_state, tiny_job
from medfed.transport.grpc.admin_client import AdminConnection
from medfed.transport.pki import load_kit

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_queue_server_killed_mid_job_resumes_it_when_started_again(tmp_path):
    kits, port = make_kits(tmp_path, sites=TWO)
    runs = tmp_path / "runs"
    args = ["server", "--kit", str(kits / "server"), "--queue", str(runs), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp_path / "server.log")
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "60"], tmp_path / f"{s}.log")
             for s in TWO}
    again = None
    try:
        wait_for(lambda: "queue server listening" in (tmp_path / "server.log").read_text(), 60, "the queue server")
        job = tiny_job(tmp_path, "long", rounds=5, train={"local_epochs": 3, "batch_size": 16, "lr": 0.02,
                                                          "optimizer": "sgd", "momentum": 0.9})
        with AdminConnection(load_kit(kits / "admin"), f"127.0.0.1:{port}") as conn:
            jid = conn.submit(job).id
        wait_for(lambda: queue_state(runs).get(jid, {}).get("round", 0) >= 1, 120, "round 1")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert queue_state(runs)[jid]["status"] == "running"
        again = start(args, tmp_path / "server2.log")
        wait_for(lambda: _ended(runs, jid), 150, "the resumed job")
        assert all(p.poll() is None for p in sites.values())  # the sites waited for the server to come back
    finally:
        stop(server, *sites.values(), *([again] if again else []))
    done = queue_state(runs)[jid]
    assert (done["status"], done["resumed"], done["round"]) == ("complete", True, 5), done
    run = runs / jid
    assert "resuming job 'long' after round" in (run / "run.log").read_text()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(m["round"], m["arm"], m["site"], m["split"], m["metric"]) for m in metrics]
    assert len(keys) == len(set(keys)) and max(m["round"] for m in metrics) == 5  # redone rounds not doubled
