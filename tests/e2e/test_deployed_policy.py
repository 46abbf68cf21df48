"""Sites govern what runs on their data, in a real deployment (a server and three site
processes): hospital_b's policy allows only FedProx, so it declines the FedAvg job before
reading any data, and the server's log names its reason; hospital_c's policy wants its
operator's approval (given with ``medfed site approve`` while the site waits) and discloses
only its split sizes; the run goes on with hospital_a and hospital_c (the quorum is one)."""

from __future__ import annotations

import json

import pytest
import yaml

from deploy_kits import make_kits, start, stop, wait_for
from e2e.test_deployment import _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_site_s_policy_refuses_the_job_and_another_s_operator_approves_it(tmp_path):
    job = _small(tmp_path, "deployed", rounds=1, compare=[], min_sites=1)
    raw = yaml.safe_load(job.read_text())
    for site in raw["data"]["sites"]:  # tiny sites: the decisions, not the training, are under test
        site.update(n_train=40, n_val=10, n_test=10)
    job.write_text(yaml.safe_dump(raw))
    (tmp_path / "fedprox_only.yaml").write_text("algorithms: [fedprox]\n")
    (tmp_path / "manual.yaml").write_text("approve: manual\ndisclose: sizes\nmax_rounds: 10\n")
    kits, port = make_kits(tmp_path)
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    policies = {"hospital_a": [], "hospital_b": ["--policy", str(tmp_path / "fedprox_only.yaml")],
                "hospital_c": ["--policy", str(tmp_path / "manual.yaml")]}
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "60", *p], tmp_path / f"{s}.log")
             for s, p in policies.items()}
    approvals = kits / "hospital_c" / "state" / "approvals.json"
    try:
        wait_for(approvals.exists, 120, "hospital_c to show the job to its operator")
        (job_hash,) = json.loads(approvals.read_text())["jobs"]
        approve = start(["site", "approve", job_hash, "--kit", str(kits / "hospital_c")], tmp_path / "approve.log")
        assert approve.wait(timeout=60) == 0, (tmp_path / "approve.log").read_text()
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert sites["hospital_a"].wait(timeout=30) == 0, (tmp_path / "hospital_a.log").read_text()[-2000:]
        assert sites["hospital_c"].wait(timeout=30) == 0, (tmp_path / "hospital_c.log").read_text()[-2000:]
        assert sites["hospital_b"].wait(timeout=30) != 0
    finally:
        stop(server, *sites.values())
    run = tmp_path / "deployed"
    log = " ".join((run / "run.log").read_text().split())
    refusal = ("site 'hospital_b' refuses the job by its policy: policy.algorithms: this site allows fedprox; the "
               "job runs fedavg")
    assert f"site 'hospital_b' cannot take part in the job: PolicyRefusal: {refusal}" in log
    assert "starting without site(s) hospital_b, which cannot take part in the job (see above)" in log
    # hospital_c: shown to its operator (settings, hash and the command), approved, trained
    c_log = "".join((tmp_path / "hospital_c.log").read_text().split())  # the terminal's lines are wrapped
    assert f"medfedsiteapprove{job_hash}--kit" in c_log and "approvedbythissite'soperator" in c_log
    audit = json.loads((run / "audit.json").read_text())["rows"]
    assert {r["site"] for r in audit if r["kind"] == "fit" and r["status"] == "accepted"} == {"hospital_a",
                                                                                              "hospital_c"}
    # disclose: sizes: the server knows hospital_c's split sizes, not its class counts
    described = {s["name"]: s for s in json.loads((run / "sites.json").read_text())["sites"]}
    assert described["hospital_a"]["class_counts"]["train"] and not described["hospital_c"]["class_counts"]
    assert described["hospital_c"]["train"] == 40
    # every decision in each site's own audit log
    b_rows = [json.loads(line) for line in (kits / "hospital_b" / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(r["decision"], r["by"]) for r in b_rows] == [("refused", "policy")]
    assert "policy.algorithms" in b_rows[0]["reason"] and b_rows[0]["job_hash"] == job_hash
    c_rows = [json.loads(line) for line in (kits / "hospital_c" / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(r["decision"], r["by"]) for r in c_rows] == [("shown", "policy"), ("approved", "operator"),
                                                          ("accepted", "operator")]
    assert not (kits / "hospital_a" / "state").exists()  # no policy: nothing kept
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
