"""A simulated run stopped at any moment and continued with ``--resume`` ends with the
model and metrics of the run never stopped, bit for bit, for every algorithm with state
at the server or the sites (server/resume.py, site/state.py).

The stops are made in this process (KeyboardInterrupt, as Ctrl-C gives, raised where a
kill could land): (a) while the sites of a round train, after some of them have trained
and saved their state; (b) between the aggregation and the round's checkpoint; (c) in
round 1, before anything was saved. One test kills a real ``medfed run`` with SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import medfed.server.runner as runner
from medfed.config import parse_job
from medfed.core.errors import ConfigError, RunDirError
from medfed.site.app import SiteApp

RAW = {
    "name": "resume", "rounds": 3, "threads": 1, "seed": 3,
    "data": {"source": "synthetic", "image_size": 16,
             "sites": [{"name": "a", "n_train": 24, "n_val": 8, "n_test": 8},
                       {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8},
                       {"name": "c", "n_train": 20, "n_val": 8, "n_test": 8}]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05, "local_epochs": 1, "momentum": 0.0},
    "compare": ["local"],
}

ALGORITHMS = {
    "fedavg": {},
    "fedadam": {"algorithm": {"name": "fedadam", "server_lr": 0.05}},
    "scaffold": {"algorithm": {"name": "scaffold"}},
    "feddyn": {"algorithm": {"name": "feddyn", "alpha": 0.1}},
    "moon": {"algorithm": {"name": "moon", "mu": 1.0}},
    "ditto": {"algorithm": {"name": "ditto", "lam": 0.1}},
    "fedce": {"algorithm": {"name": "fedce"}},
    "fedbn": {"algorithm": {"name": "fedbn"}},
    "fedper": {"algorithm": {"name": "fedper", "personal_layers": ["head"]}},
    "fedrep": {"algorithm": {"name": "fedrep", "personal_layers": ["head"]}},
    "topk": {"compression": {"method": "topk", "fraction": 0.2}},
    "dp_central_sampled": {"privacy": {"dp": {"clip": 1.0, "noise_multiplier": 0.3, "noise": "central", "delta": 1e-3}},
                           "sampling": {"fraction": 0.67}, "model": {"name": "small_cnn", "width": 4, "norm": "group"}},
    "loss_sampling": {"sampling": {"method": "loss", "fraction": 0.67, "candidates": 3}},
    # seed 0 draws c, then b, then a and c (round 3, where the stop lands at c); the sites take 3, 2, 3 steps
    "unbiased_sampling": {"seed": 0, "sampling": {"method": "unbiased", "count": 2}},
    "cyclic_fedbn": {"topology": {"kind": "cyclic", "order": "shuffled"}, "algorithm": {"name": "fedbn"}},
    "swarm_leader": {"topology": {"kind": "swarm", "merge": "leader"}},
    "swarm_gossip_fedbn": {"topology": {"kind": "swarm", "merge": "gossip", "peers": 1}, "algorithm": {"name": "fedbn"}},
    "swarm_braintorrent": {"topology": {"kind": "swarm", "merge": "braintorrent"}},
}


def _job(tmp_path, name, over):
    raw = {**copy.deepcopy(RAW), **copy.deepcopy(over), "output": str(tmp_path / name)}
    return parse_job(raw)


class Stop(KeyboardInterrupt):
    """A stop raised where a kill could land."""


def _records(run):
    return (run / "metrics.jsonl").read_text().splitlines()


def _model(run):
    return load_file(str(run / "model_final.safetensors"))


def _same_run(a, b):
    ma, mb = _model(a), _model(b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    best_a, best_b = load_file(str(a / "model_best.safetensors")), load_file(str(b / "model_best.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert _records(a) == _records(b)


def _stop_while_training(monkeypatch, rnd, site):
    """(a): the stop lands in ``site``'s training of federated round ``rnd``, after the
    sites before it trained that round (and saved their state)."""
    fit = SiteApp._fit

    def stopping(self, params, plan):
        if plan.arm.value == "federated" and plan.round == rnd and self.name == site:
            raise Stop()
        return fit(self, params, plan)

    monkeypatch.setattr(SiteApp, "_fit", stopping)


def _stop_before_checkpoint(monkeypatch, rnd):
    """(b): the stop lands after round ``rnd`` was aggregated, evaluated and its best model
    saved, before its resume point is written."""
    save = runner.save_state

    def stopping(folder, r, *args):
        if r == rnd:
            raise Stop()
        return save(folder, r, *args)

    monkeypatch.setattr(runner, "save_state", stopping)


def _stopped_then_resumed(tmp_path, monkeypatch, over, stop):
    job = _job(tmp_path, "stopped", over)
    with monkeypatch.context() as m:
        stop(m)
        with pytest.raises(Stop):
            runner.run_job(job)
    assert not job.output.exists()
    partial = list(tmp_path.glob(".stopped.partial-*"))
    assert len(partial) == 1, "the stopped run is kept for --resume"
    # the stopped run's folder now belongs to a process that is gone: name it so
    os.rename(partial[0], tmp_path / ".stopped.partial-999999999")
    result = runner.run_job(job, resume=True)
    assert json.loads((result.run_dir / "run.json").read_text())["resumed"] is True
    assert not (result.run_dir / "state.safetensors").exists() and not (result.run_dir / "site-state").exists()
    assert not list(result.run_dir.glob("swarm-state-*"))
    return result.run_dir


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_stopped_while_sites_train_then_resumed_equals_the_run_never_stopped(name, tmp_path, monkeypatch, caplog):
    straight = runner.run_job(_job(tmp_path, "straight", ALGORITHMS[name])).run_dir
    with caplog.at_level("INFO", logger="medfed"):
        resumed = _stopped_then_resumed(tmp_path, monkeypatch, ALGORITHMS[name],
                                        lambda m: _stop_while_training(m, 3, "c"))
    _same_run(straight, resumed)
    assert "resuming job 'resume' after round 2 of 3" in caplog.text
    assert "no longer continues exactly" not in caplog.text
    if name in ("scaffold", "ditto", "fedbn", "topk"):  # sites a and b had trained round 3: they went back
        assert "federated round 3 again (the server resumed): back to its state of round 2" in caplog.text


@pytest.mark.parametrize("name", ["scaffold", "ditto", "fedadam", "swarm_braintorrent"])
def test_stopped_between_aggregation_and_checkpoint_then_resumed_equals_the_run_never_stopped(
        name, tmp_path, monkeypatch):
    straight = runner.run_job(_job(tmp_path, "straight", ALGORITHMS[name])).run_dir
    resumed = _stopped_then_resumed(tmp_path, monkeypatch, ALGORITHMS[name], lambda m: _stop_before_checkpoint(m, 2))
    _same_run(straight, resumed)


@pytest.mark.parametrize("name", ["scaffold", "fedavg"])
def test_stopped_in_round_one_then_resumed_equals_the_run_never_stopped(name, tmp_path, monkeypatch, caplog):
    straight = runner.run_job(_job(tmp_path, "straight", ALGORITHMS[name])).run_dir
    with caplog.at_level("INFO", logger="medfed"):
        resumed = _stopped_then_resumed(tmp_path, monkeypatch, ALGORITHMS[name],
                                        lambda m: _stop_while_training(m, 1, "b"))
    _same_run(straight, resumed)
    assert "from round 1: it stopped before a round was saved" in caplog.text


def test_a_site_that_lost_its_state_is_named_in_the_log(tmp_path, monkeypatch, caplog):
    job = _job(tmp_path, "stopped", ALGORITHMS["scaffold"])
    with monkeypatch.context() as m:
        _stop_before_checkpoint(m, 2)
        with pytest.raises(Stop):
            runner.run_job(job)
    partial = next(tmp_path.glob(".stopped.partial-*"))
    os.rename(partial, tmp_path / ".stopped.partial-999999999")
    (tmp_path / ".stopped.partial-999999999" / "site-state" / "site-00001.safetensors").unlink()
    with caplog.at_level("WARNING", logger="medfed"):
        runner.run_job(job, resume=True)
    assert ("federated round 2: site 'b' trained from no state (lost or never saved), but the last update of it the "
            "run kept is from round 1") in caplog.text


def test_a_run_that_fails_after_a_round_is_kept_and_resumed(tmp_path, monkeypatch, caplog):
    from medfed.core.errors import RoundError

    over = ALGORITHMS["scaffold"]
    straight = runner.run_job(_job(tmp_path, "straight", over)).run_dir
    job = _job(tmp_path, "stopped", over)
    fit = SiteApp._fit

    def failing(self, params, plan):
        if plan.arm.value == "federated" and plan.round == 3:
            raise ValueError("the scanner archive went offline")
        return fit(self, params, plan)

    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="medfed"):
        m.setattr(SiteApp, "_fit", failing)
        with pytest.raises(RoundError, match="quorum"):
            runner.run_job(job)
    assert "failed; the rounds done so far are kept in" in caplog.text
    partial = next(tmp_path.glob(".stopped.partial-*"))
    os.rename(partial, tmp_path / ".stopped.partial-999999999")
    _same_run(straight, runner.run_job(job, resume=True).run_dir)


def test_resume_refusals(tmp_path, monkeypatch):
    job = _job(tmp_path, "stopped", {})
    with pytest.raises(RunDirError, match="nothing to resume"):
        runner.run_job(job, resume=True)
    with monkeypatch.context() as m:
        _stop_while_training(m, 2, "a")
        with pytest.raises(Stop):
            runner.run_job(job)
    # the process that left the folder is alive (this one, under another pid): refused
    partial = next(tmp_path.glob(".stopped.partial-*"))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        os.rename(partial, tmp_path / f".stopped.partial-{alive.pid}")
        with pytest.raises(RunDirError, match="still going on"):
            runner.run_job(job, resume=True)
    finally:
        alive.kill()
        alive.wait()
    os.rename(tmp_path / f".stopped.partial-{alive.pid}", tmp_path / ".stopped.partial-999999999")
    changed = _job(tmp_path, "stopped", {"rounds": 4})
    with pytest.raises(RunDirError, match="another job"):
        runner.run_job(changed, resume=True)
    assert len(list(tmp_path.glob(".stopped.partial-*"))) == 1, "a refused resume loses nothing"
    for over, field in (({"contribution": {"method": "loo"}}, "contribution"),
                        ({"transport": "ray"}, "transport ray")):
        with pytest.raises(ConfigError, match=field):
            runner.run_job(_job(tmp_path, "stopped", over), resume=True)
    from medfed.server.resume import check_resumable

    bundled = job.model_copy(update={"train": job.train.model_copy(update={"engine": "bundle"})})  # as with a bundle
    with pytest.raises(ConfigError, match="train.engine: bundle keeps the bundle trainer's optimizer"):
        check_resumable(bundled, from_python=False)


def test_medfed_run_killed_with_sigkill_then_resumed_equals_the_run_never_stopped(tmp_path):
    raw = {**copy.deepcopy(RAW), **ALGORITHMS["scaffold"], "rounds": 4, "output": "killed"}
    raw["data"]["image_size"] = 24
    for s in raw["data"]["sites"]:
        s["n_train"] *= 4
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(raw))
    straight = runner.run_job(parse_job({**raw, "output": str(tmp_path / "straight")})).run_dir
    cmd = [sys.executable, "-c", "from medfed.cli import main; main()", "run", str(job_file), "-o", str(tmp_path / "killed"), "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until round 2 is saved and round 3 under way
            logs = list(tmp_path.glob(".killed.partial-*/run.log"))
            if logs and "federated round 3/4 started" in logs[0].read_text():
                break
            time.sleep(0.02)
        else:
            pytest.fail("round 3 never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    done = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _same_run(straight, tmp_path / "killed")
