"""One server, many jobs: a queue server (``medfed server --queue``) on 127.0.0.1, two site
processes started once, and an admin submitting jobs with the admin kit (``medfed submit``,
``medfed jobs``). Both jobs run, each in its own run folder, while the sites stay connected
(same processes); a job that fails is marked failed and the next one still runs; a site's
certificate cannot submit; a queued job can be aborted. (A queue server killed mid-job:
test_job_queue_restart.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml

from deploy_kits import CLI, make_kits, start, stop, wait_for
from medfed.config import builtin_job_path
from medfed.transport.grpc.admin_client import AdminConnection, AdminRefused
from medfed.transport.grpc.client import Connection
from medfed.transport.pki import load_kit

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TWO = ("hospital_a", "hospital_b")


def tiny_job(tmp: Path, name: str, rounds: int = 1, sites=TWO, **over) -> Path:
    """Two small synthetic sites, a narrow CNN: a round takes a fraction of a second."""
    raw = yaml.safe_load(builtin_job_path("quickstart").read_text())
    raw["data"]["image_size"] = 16
    raw["data"]["sites"] = [s for s in raw["data"]["sites"] if s["name"] in sites]
    for s in raw["data"]["sites"]:
        s.update(n_train=48, n_val=16, n_test=16)
    raw.update({"name": name, "output": str(tmp / "ignored" / name), "threads": 1, "round_timeout": 30,
                "rounds": rounds, "compare": [], "model": {"name": "small_cnn", "width": 4}, **over})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def medfed(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A short medfed command (submit, jobs), its output captured (wide: no wrapped lines)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "250"})


def queue_state(runs: Path) -> dict[str, dict]:
    """The queue's jobs by id, as the server wrote them (queue.json)."""
    path = runs / "queue.json"
    return {j["id"]: j for j in json.loads(path.read_text())["jobs"]} if path.is_file() else {}


def _ended(runs: Path, *ids: str) -> bool:
    jobs = queue_state(runs)
    return all(jobs.get(i, {}).get("status") in ("complete", "failed", "aborted") for i in ids)


def test_one_server_runs_job_after_job_while_the_sites_stay_connected(tmp_path):
    kits, port = make_kits(tmp_path, sites=TWO)
    runs = tmp_path / "runs"
    server = start(["server", "--kit", str(kits / "server"), "--queue", str(runs), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "60"], tmp_path / f"{s}.log")
             for s in TWO}
    pids = {s: p.pid for s, p in sites.items()}
    admin = str(kits / "admin")
    try:
        wait_for(lambda: "queue server listening" in (tmp_path / "server.log").read_text(), 60, "the queue server")
        # a bad job is refused with the ConfigError's text, as medfed validate would say it
        bad = tiny_job(tmp_path, "bad", topology={"kind": "hierarchical"})
        out = medfed("submit", str(bad), "--kit", admin)
        assert out.returncode == 2 and "topology" in out.stderr, out.stderr
        # the server itself refuses a site's certificate on the admin service, naming its role
        with AdminConnection(load_kit(kits / "hospital_a"), f"127.0.0.1:{port}") as conn:
            with pytest.raises(AdminRefused, match=r"'hospital_a' has the site role, not the admin role.*"
                                                   r"PERMISSION_DENIED"):
                conn.submit(tiny_job(tmp_path, "sneaky"))
        # and an admin's certificate cannot take part as a site
        ak = load_kit(kits / "admin")
        site = Connection(f"127.0.0.1:{port}", ak.ca_pem, ak.cert_pem, ak.key_pem, "admin")
        with pytest.raises(grpc.RpcError) as refusal:
            site.join()
        site.close()
        assert refusal.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "is an admin certificate (role admin), not a site certificate" in refusal.value.details()
        # three jobs: the second fails (its quorum of 3 training sites cannot be met by 2 sites)
        # while the sites stay connected; the first and third run
        out = medfed("submit", str(tiny_job(tmp_path, "first", rounds=2)), "--kit", admin)
        assert out.returncode == 0, out.stderr
        ids = [out.stdout.split("job ")[1].split()[0]]
        with AdminConnection(load_kit(kits / "admin"), f"127.0.0.1:{port}") as conn:  # as medfed submit does
            ids.append(conn.submit(tiny_job(tmp_path, "dropped", rounds=2)).id)
            # queued behind the first (or, were the first done, stopped at its first round)
            aborted = medfed("jobs", "abort", ids[1], "--kit", admin)
            assert aborted.returncode == 0 and f"job {ids[1]}" in aborted.stdout, aborted.stderr
            ids.append(conn.submit(tiny_job(tmp_path, "doomed", sites=("hospital_a", "hospital_b", "hospital_c"),
                                            round_timeout=3)).id)
            ids.append(conn.submit(tiny_job(tmp_path, "second", rounds=1)).id)
        dropped = ids.pop(1)
        wait_for(lambda: _ended(runs, *ids, dropped), 150, "the jobs")
        unknown = medfed("jobs", "show", "9999", "--kit", admin)
        assert unknown.returncode == 1 and "no job '9999'" in unknown.stderr, unknown.stderr
        listed = medfed("jobs", "list", "--kit", admin)
        assert listed.returncode == 0 and all(i in listed.stdout for i in ids), listed.stderr
        shown = medfed("jobs", "show", ids[1], "--kit", admin)
        assert "failed" in shown.stdout and "quorum" in shown.stdout, shown.stdout
        assert all(p.poll() is None for p in sites.values())  # never restarted: the same processes
        assert {s: p.pid for s, p in sites.items()} == pids
    finally:
        stop(server, *sites.values())
    jobs = queue_state(runs)
    assert [jobs[i]["status"] for i in ids] == ["complete", "failed", "complete"], jobs
    assert jobs[dropped]["status"] == "aborted" and "by admin 'admin'" in jobs[dropped]["error"]
    assert "quorum" in jobs[ids[1]]["error"]
    for i, rounds in ((ids[0], 2), (ids[2], 1)):
        run = runs / i
        assert jobs[i]["run_dir"] == str(run) and jobs[i]["round"] == rounds
        assert json.loads((run / "run.json").read_text())["status"] == "complete"
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(m["round"] for m in metrics if m["arm"] == "federated") == rounds
    assert not (tmp_path / "ignored").exists()  # the job's own output is not used
    for s in TWO:  # each site took both jobs, one after the other, in the one process
        told = (tmp_path / f"{s}.log").read_text()
        assert told.count("the server says the job is done") == 2, told[-2000:]
    log = " ".join((tmp_path / "server.log").read_text().split())
    assert "the server takes the next job" in log
    assert "refused SubmitJob from 'hospital_a'" in log and "site role" in log
    audit = [json.loads(x) for x in (runs / "admin-audit.jsonl").read_text().splitlines()]
    submits = [(r["who"], r["outcome"]) for r in audit if r["method"] == "SubmitJob"]
    assert submits.count(("admin", "ok")) == 4 and ("hospital_a", "refused (PERMISSION_DENIED)") in submits

