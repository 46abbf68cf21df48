"""A site's policy (``medfed site --policy``): each rule refuses and allows, before any data is
read; ``disclose: sizes`` keeps the class counts at the site; manual approval per job hash;
every decision in the site's audit log."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import builtin_job_path, load_job, parse_job
from medfed.config.policy import load_policy, parse_policy
from medfed.core.errors import ConfigError
from medfed.site.approvals import ApprovalStore, AuditLog, Status, state_folder
from medfed.site.policy import Gate, PolicyRefusal, gate_for, model_name, refusals
from medfed.site.remote import RemoteSite
from medfed.transport.grpc.hub import site_view

DP = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
GROUP = {"name": "small_cnn", "width": 16, "norm": "group"}  # site-level DP refuses batch norm
SECAGG = {"secure_aggregation": {}}


def _view(tmp_path, **over) -> dict:
    job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp_path / "run"})
    view = site_view(job)
    view.update(over)
    return view


def _job(tmp_path, **over):
    return parse_job(_view(tmp_path, **over), source="test job")


@pytest.mark.parametrize(
    "policy, over, message",
    [
        ({"tasks": ["segmentation"]}, {},
         "policy.tasks: this site allows segmentation; the job's task is classification"),
        ({"models": ["unet", "monai:*"]}, {},
         "policy.models: this site allows unet, monai:*; the job's model is small_cnn"),
        ({"models": ["import:otherpkg"]}, {"model": {"import": "mfpkg.nets:build"}},
         "policy.models: this site allows import:otherpkg; the job's model is import:mfpkg.nets:build"),
        ({"algorithms": ["fedavg", "fedprox"]}, {"algorithm": {"name": "fedyogi"}},
         "policy.algorithms: this site allows fedavg, fedprox; the job runs fedyogi"),
        ({"topologies": ["server"]}, {"topology": {"kind": "cyclic"}},
         "policy.topologies: this site allows server; the job's topology is cyclic"),
        ({"disclose": "sizes"}, {"topology": {"kind": "split", "cut": "features.0", "u_shaped": False}},
         "policy.disclose: this site discloses split sizes only; the job's split learning without the U"),
        ({"max_rounds": 10}, {}, "policy.max_rounds: this site allows at most 10 rounds; the job runs 20"),
        ({"privacy": {"require_dp": True}}, {},
         "policy.privacy.require_dp: this site requires differential privacy; the job has none"),
        ({"privacy": {"max_epsilon": 3}}, {},
         "policy.privacy.max_epsilon: this site allows epsilon <= 3; the job has no differential privacy"),
        ({"privacy": {"require_secure_aggregation": True}}, {},
         "policy.privacy.require_secure_aggregation: this site requires secure aggregation; the job has none"),
        ({"peers": ["hospital_b"]}, {},
         "policy.peers: this site accepts hospital_b as peers; the job also has hospital_c"),
        ({"allowed_imports": ["mfpkg"]}, {"model": {"import": "evil.nets:build"}},
         "policy.allowed_imports: this site allows code from mfpkg only; the job's model.import is "
         "'evil.nets:build' (package 'evil')"),
        ({"allowed_imports": []}, {"model": {"import": "mfpkg.nets:build"}},
         "policy.allowed_imports: this site allows no imported code; the job's model.import is"),
        ({"allowed_imports": ["mfpkg"]},
         {"task": {"labels": "binary", "num_classes": 2, "loss": {"import": "lossy.l:make"}}},
         "the job's task.loss.import is 'lossy.l:make' (package 'lossy')"),
    ],
)
def test_each_rule_refuses_a_job_that_breaks_it_naming_field_and_value(tmp_path, policy, over, message):
    found = refusals(parse_policy(policy, "policy"), _job(tmp_path, **over), "hospital_a")
    assert len(found) == 1 and message in found[0], found


@pytest.mark.parametrize(
    "policy, over",
    [
        ({"tasks": ["classification"]}, {}),
        ({"models": ["small_cnn"]}, {}),
        ({"models": ["monai:*"]}, {"model": {"monai": "DenseNet121", "args": {}}}),
        ({"models": ["monai:DenseNet121"]}, {"model": {"monai": "DenseNet121"}}),
        ({"models": ["import:mfpkg"]}, {"model": {"import": "mfpkg.nets:build"}}),
        ({"models": ["import:mfpkg.nets"]}, {"model": {"import": "mfpkg.nets:build"}}),
        ({"algorithms": ["fedprox"]}, {"algorithm": {"name": "fedprox", "mu": 0.1}}),
        ({"topologies": ["server", "cyclic"]}, {"topology": {"kind": "cyclic"}}),
        ({"disclose": "sizes"}, {"topology": {"kind": "split", "cut": "features.0"}}),  # the labels stay
        ({"max_rounds": 20}, {}),
        ({"privacy": {"require_dp": True, "require_secure_aggregation": True}},
         {"privacy": {"dp": DP, **SECAGG}, "model": GROUP}),
        ({"peers": ["hospital_b", "hospital_c"]}, {}),  # the site itself need not be listed
        ({"allowed_imports": ["mfpkg"]}, {"model": {"import": "mfpkg.nets:build"}}),
        ({"allowed_imports": []}, {}),  # no imported code in the job
        ({"allow_bundles": False}, {}),
        ({}, {"algorithm": {"name": "fedyogi"}, "rounds": 200}),  # an unset field restricts nothing
    ],
)
def test_each_rule_allows_a_job_that_keeps_it(tmp_path, policy, over):
    assert refusals(parse_policy(policy, "policy"), _job(tmp_path, **over), "hospital_a") == []


def test_every_broken_rule_is_named(tmp_path):
    policy = parse_policy({"algorithms": ["fedprox"], "max_rounds": 5}, "policy")
    found = refusals(policy, _job(tmp_path), "hospital_a")
    assert [f.split(":")[0] for f in found] == ["policy.algorithms", "policy.max_rounds"]


def test_model_names_in_the_policy_s_terms(tmp_path):
    assert model_name(_job(tmp_path).model) == "small_cnn"
    assert model_name(_job(tmp_path, model={"monai": "DenseNet121"}).model) == "monai:DenseNet121"


def test_a_policy_file_with_an_unknown_field_is_an_error_naming_it_and_logged(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("algorithms: [fedavg]\nalgorythms: [fedprox]\nprivacy: {max_epsilon: 3, require_dp: yes, eps: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    text = str(e.value)
    assert f"policy file '{path}' is invalid" in text
    assert "algorythms: is not a known field" in text and "(a policy has: tasks, models, algorithms" in text
    assert "privacy.eps: is not a known field" in text and "(a privacy section has: require_dp" in text
    # at the site: refused at start, and the audit log says so
    with pytest.raises(ConfigError, match="algorythms"):
        gate_for(path, tmp_path / "kit", "hospital_a")
    rows = AuditLog(state_folder(tmp_path / "kit"), "hospital_a").read()
    assert rows[-1]["decision"] == "invalid" and "algorythms" in rows[-1]["reason"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"models": ["unet", "my_net"]}, "models[1]: 'my_net' is not a model this policy can name"),
        ({"algorithms": ["fedavg", "fedmagic"]}, "algorithms[1]: unknown algorithm 'fedmagic'"),
        ({"approve": "sometimes"}, "approve: input should be 'auto' or 'manual'"),
        ({"disclose": "all"}, "disclose: input should be 'counts' or 'sizes'"),
        ({"allowed_imports": ["pkg.sub"]}, "allowed_imports[0]: 'pkg.sub' is not a top-level package name"),
        ({"peers": []}, "peers: must have at least 1 item(s)"),
    ],
)
def test_bad_policy_values_are_named(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_policy(raw, "policy file 'p.yaml'")


def _gate(tmp_path, policy: dict, **kw) -> Gate:
    return Gate(parse_policy(policy, "policy"), tmp_path / "state", "hospital_a", **kw)


def _audit(tmp_path) -> list[tuple[str, str]]:
    return [(r["decision"], r["by"]) for r in AuditLog(tmp_path / "state", "hospital_a").read()]


def test_a_refused_job_reads_no_data_and_the_audit_log_says_why(tmp_path, monkeypatch):
    import medfed.data.sites as sites

    monkeypatch.setattr(sites, "build_sites", lambda *a, **k: pytest.fail("data read for a refused job"))
    site = RemoteSite("hospital_a", None, gate=_gate(tmp_path, {"algorithms": ["fedprox"]}))
    with pytest.raises(PolicyRefusal, match="site 'hospital_a' refuses the job by its policy: policy.algorithms: "
                                            "this site allows fedprox; the job runs fedavg"):
        site.setup(_view(tmp_path), "job1")
    row = AuditLog(tmp_path / "state", "hospital_a").read()[-1]
    assert (row["decision"], row["by"], row["job_id"], row["job"]) == ("refused", "policy", "job1", "quickstart")
    assert len(row["job_hash"]) == 64 and "policy.algorithms" in row["reason"]
    assert (tmp_path / "state" / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_disclose_sizes_keeps_the_class_counts_at_the_site(tmp_path):
    counts, _ = RemoteSite("hospital_b", None, gate=_gate(tmp_path, {})).setup(_view(tmp_path), "job1")
    sizes, _ = RemoteSite("hospital_b", None, gate=_gate(tmp_path, {"disclose": "sizes"})).setup(_view(tmp_path), "j")
    assert counts["class_counts"]["train"] and "class_counts" not in sizes
    assert (sizes["train"], sizes["val"], sizes["test"], sizes["shape"]) == (300, 60, 200, [1, 32, 32])
    assert _audit(tmp_path) == [("accepted", "policy"), ("accepted", "policy")]


def test_the_policy_s_epsilon_limit_is_checked_as_max_epsilon_is(tmp_path):
    site = RemoteSite("hospital_a", None, max_epsilon=50.0, gate=_gate(tmp_path, {"privacy": {"max_epsilon": 1}}))
    with pytest.raises(ConfigError, match=r"policy.privacy.max_epsilon: site 'hospital_a' allows epsilon <= 1, but "
                                          r"the job reaches 30.1"):
        site.setup(_view(tmp_path, privacy={"dp": DP}, model=GROUP), "job1")
    # accepted by the rules (the job has DP), then refused once the epsilon is known: both in the log
    assert _audit(tmp_path) == [("accepted", "policy"), ("refused", "site")]


def _admit_in_thread(gate: Gate, job, job_id="job1"):
    result: dict = {}

    def run():
        try:
            gate.admit(job, job_id)
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _wait_pending(store: ApprovalStore, job_hash: str) -> None:
    deadline = time.monotonic() + 10
    while store.get(job_hash) is None:
        assert time.monotonic() < deadline, "the job was never shown"
        time.sleep(0.02)


def test_manual_approval_waits_for_the_operator_and_is_remembered_per_hash(tmp_path, caplog):
    caplog.set_level("INFO", logger="medfed")
    job = _job(tmp_path)
    h = job.job_hash()
    gate = _gate(tmp_path, {"approve": "manual"}, kit=tmp_path / "kit", poll_s=0.02)
    t, result = _admit_in_thread(gate, job)
    _wait_pending(gate.store, h)
    assert t.is_alive()  # waiting
    gate.store.decide(h[:16], Status.APPROVED)  # the job id is enough
    t.join(10)
    assert result == {"ok": True}
    log = caplog.text
    assert f"job hash {h}" in log and f'medfed site approve {h} --kit "{tmp_path / "kit"}"' in log
    assert "rounds: 20" in log  # its resolved settings, line by line
    assert (tmp_path / "state" / "jobs" / f"{h}.yaml").read_text() == job.to_yaml()
    # remembered: the same job again runs at once, without being shown
    assert _gate(tmp_path, {"approve": "manual"}, approval_timeout=0).admit(job, "job1") is None
    assert _audit(tmp_path) == [("shown", "policy"), ("accepted", "operator"), ("accepted", "operator")]
    # another job (another hash) is shown again
    with pytest.raises(PolicyRefusal, match="did not approve the job"):
        _gate(tmp_path, {"approve": "manual"}, approval_timeout=0.05, poll_s=0.01).admit(_job(tmp_path, rounds=5), "j2")


def test_a_rejected_job_is_refused_with_the_operator_s_reason_and_stays_rejected(tmp_path):
    job = _job(tmp_path)
    h = job.job_hash()
    gate = _gate(tmp_path, {"approve": "manual"}, poll_s=0.02)
    t, result = _admit_in_thread(gate, job)
    _wait_pending(gate.store, h)
    gate.store.decide(h, Status.REJECTED, "not on our scanners' data")
    t.join(10)
    assert isinstance(result["error"], PolicyRefusal)
    assert "its operator rejected the job" in str(result["error"]) and "(not on our scanners' data)" in str(result["error"])
    with pytest.raises(PolicyRefusal, match="rejected"):  # remembered: no wait
        _gate(tmp_path, {"approve": "manual"}, approval_timeout=100).admit(job, "job1")
    assert [d for d, _ in _audit(tmp_path)] == ["shown", "refused", "refused"]


def test_no_decision_within_the_timeout_refuses_telling_what_to_run(tmp_path):
    job = _job(tmp_path)
    gate = _gate(tmp_path, {"approve": "manual"}, kit=tmp_path / "kit", approval_timeout=0.1, poll_s=0.02)
    with pytest.raises(PolicyRefusal, match=r"did not approve the job \(hash [0-9a-f]{16}\) within 0.1 s .*medfed "
                                            r"site approve [0-9a-f]{64} --kit"):
        gate.admit(job, "job1")
    assert _audit(tmp_path) == [("shown", "policy"), ("timed_out", "policy")]
    assert ApprovalStore(tmp_path / "state").get(job.job_hash()).status is Status.PENDING


def test_an_approval_for_a_hash_no_job_has_is_refused_naming_the_jobs_shown(tmp_path):
    store = ApprovalStore(tmp_path / "state")
    with pytest.raises(ConfigError, match="no job with hash 0123456789abcdef0 has been shown at this site"):
        store.decide("0123456789abcdef0", Status.APPROVED)
    with pytest.raises(ConfigError, match="'xyz' is not a job hash"):
        store.decide("xyz", Status.APPROVED)
    with pytest.raises(ConfigError, match="is not a job hash"):
        store.decide("0123abcd", Status.APPROVED)  # too short to name one job surely
    store.show("ab" * 32, "ab" * 8, "quickstart")
    with pytest.raises(ConfigError, match=r"jobs shown here: abababababababab 'quickstart' \(pending\)"):
        store.decide("cd" * 32, Status.APPROVED)
    assert json.loads((tmp_path / "state" / "approvals.json").read_text())["jobs"]["ab" * 32]["status"] == "pending"
    assert (tmp_path / "state" / "approvals.json").stat().st_mode & 0o777 == 0o600


def test_a_damaged_approvals_file_is_an_error_saying_what_to_do(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "approvals.json").write_text("{not json")
    with pytest.raises(ConfigError, match="approvals file .* is not valid JSON .*move it away"):
        ApprovalStore(tmp_path / "state").get("ab" * 32)


def test_the_approve_and_reject_commands(tmp_path):
    from deploy_kits import make_kits

    kits, _ = make_kits(tmp_path, sites=("hospital_a",))
    kit = kits / "hospital_a"
    store = ApprovalStore(state_folder(kit))
    store.show("ab" * 32, "ab" * 8, "quickstart")
    runner = CliRunner()
    bad = runner.invoke(app, ["site", "approve", "cd" * 32, "--kit", str(kit)])
    assert bad.exit_code == 2 and "no job with hash" in bad.output
    ok = runner.invoke(app, ["site", "approve", "ab" * 8, "--kit", str(kit)])
    assert ok.exit_code == 0, ok.output
    assert "approved" in ok.output and store.get("ab" * 32).status is Status.APPROVED
    no = runner.invoke(app, ["site", "reject", "ab" * 32, "--kit", str(kit), "--reason", "changed our mind"])
    assert no.exit_code == 0, no.output
    rec = store.get("ab" * 32)
    assert rec.status is Status.REJECTED and rec.reason == "changed our mind"
    rows = AuditLog(state_folder(kit), "hospital_a").read()
    assert [(r["decision"], r["by"]) for r in rows] == [("invalid", "operator"), ("approved", "operator"),
                                                       ("rejected", "operator")]
    assert "no job with hash" in rows[0]["reason"] and rows[2]["reason"] == "changed our mind"
    # the site command itself is unchanged: --kit is still required
    missing = runner.invoke(app, ["site"])
    assert missing.exit_code == 2 and "--kit" in missing.output


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions that bind")
def test_a_state_folder_the_site_cannot_write_is_an_error_at_start(tmp_path):
    (tmp_path / "policy.yaml").write_text("approve: manual\n")
    kit = tmp_path / "kit"
    kit.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match="state folder .* cannot be written"):
            gate_for(tmp_path / "policy.yaml", kit, "hospital_a")
    finally:
        kit.chmod(0o700)
