"""End to end through the command line: tiny synthetic sites, a couple of rounds."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medfed.cli import app

runner = CliRunner()

TINY = {
    "name": "tiny",
    "seed": 3,
    "output": "PLACEHOLDER",
    "rounds": 2,
    "threads": 1,
    "data": {
        "source": "synthetic",
        "image_size": 16,
        "sites": [
            {"name": "a", "n_train": 40, "n_val": 10, "n_test": 12, "prevalence": 0.4},
            {"name": "b", "n_train": 24, "n_val": 10, "n_test": 12, "prevalence": 0.5,
             "scanner": {"intensity_scale": 1.2, "noise": 0.05, "blur": 0.5}},
            {"name": "c", "n_train": 16, "n_val": 10, "n_test": 12, "prevalence": 0.3},
        ],
    },
    "model": {"name": "small_cnn", "width": 4},
    "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05},
    "compare": ["local", "centralized"],
}


def _job(tmp_path: Path, name="job.yaml", **overrides) -> Path:
    body = {**TINY, "output": str(tmp_path / "run"), **overrides}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_a_complete_run_folder(tmp_path):
    job = _job(tmp_path)
    res = runner.invoke(app, ["run", str(job), "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    for f in ["job.yaml", "sites.json", "metrics.jsonl", "run.json", "run.log", "report.html",
              "model_final.safetensors", "model_final.json", "model_best.safetensors", "model_best.json"]:
        assert (run / f).is_file(), f
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    recs = _records(run)
    arms = {r["arm"] for r in recs}
    assert arms == {"federated", "local", "centralized"}
    # every site, every arm, both eval splits at the final round
    final = {(r["arm"], r["site"], r["split"]) for r in recs if r["round"] == 2 and r["metric"] == "auc"}
    for arm in arms:
        for site in ["a", "b", "c", "all"]:
            assert (arm, site, "test") in final and (arm, site, "val") in final
    side = json.loads((run / "model_best.json").read_text())
    assert side["metric"] == "val_auc" and side["round"] in (1, 2) and len(side["job_hash"]) == 64
    assert "federated" in res.output  # the summary table, with the spread across sites
    assert all(label in res.output for label in ("worst site", "best site", "std across sites", "gap (best"))
    html = (run / "report.html").read_text()
    assert '<tr class="spread"><td>worst site</td>' in html and "<td>gap (best − worst)</td>" in html
    assert not list(tmp_path.glob(".run.partial-*"))


def test_same_job_same_metrics(tmp_path):
    a = _job(tmp_path, "a.yaml", output=str(tmp_path / "r1"), compare=[])
    b = _job(tmp_path, "b.yaml", output=str(tmp_path / "r2"), compare=[])
    assert runner.invoke(app, ["run", str(a), "-q"]).exit_code == 0
    assert runner.invoke(app, ["run", str(b), "-q"]).exit_code == 0
    assert (tmp_path / "r1" / "metrics.jsonl").read_text() == (tmp_path / "r2" / "metrics.jsonl").read_text()


def test_existing_run_is_refused_and_kept(tmp_path):
    job = _job(tmp_path, compare=[], rounds=1)
    assert runner.invoke(app, ["run", str(job), "-q"]).exit_code == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    res = runner.invoke(app, ["run", str(job), "-q"])
    assert res.exit_code == 2
    assert "already holds a run" in res.output and "--overwrite" in res.output
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert runner.invoke(app, ["run", str(job), "-q", "--overwrite"]).exit_code == 0


def test_missing_data_file_fails_cleanly(tmp_path):
    job = _job(tmp_path, data={"source": "medmnist", "path": "missing.npz",
                               "partition": {"method": "iid", "sites": ["a", "b"]}})
    res = runner.invoke(app, ["run", str(job), "-q"])
    assert res.exit_code == 2
    assert "missing.npz" in res.output
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.partial-*"))


def test_validate_and_report_commands(tmp_path):
    good = _job(tmp_path, compare=[], rounds=1)
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 0 and "3 sites" in res.output
    wrong_layer = _job(tmp_path, "layer.yaml", algorithm={"name": "fedper", "personal_layers": ["fc"]})
    res = runner.invoke(app, ["validate", str(wrong_layer)])
    assert res.exit_code == 2 and "'fc' is not a layer of model 'SmallCNN'" in res.output
    bad = _job(tmp_path, "bad.yaml", train={"lr": -1})
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2 and "train.lr: must be > 0, got -1" in res.output
    assert runner.invoke(app, ["run", str(good), "-q"]).exit_code == 0
    (tmp_path / "run" / "report.html").unlink()
    res = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0 and (tmp_path / "run" / "report.html").is_file()
    res = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nowhere" in res.output


@pytest.mark.parametrize(
    "algorithm",
    [{"name": "fedprox", "mu": 0.1}, {"name": "fedavgm", "beta1": 0.5}, {"name": "fedadam", "server_lr": 0.01},
     {"name": "fedyogi", "server_lr": 0.01}, {"name": "fedadagrad", "server_lr": 0.01}, {"name": "scaffold"},
     {"name": "fedbn"}, {"name": "fednova"}, {"name": "feddyn", "alpha": 0.01},
     {"name": "fedper", "personal_layers": ["head"]}, {"name": "ditto", "lam": 0.1},
     {"name": "moon", "mu": 1.0}, {"name": "fedrep", "personal_layers": ["head"]}, {"name": "qfedavg", "q": 1.0}],
)
def test_every_algorithm_runs_end_to_end(tmp_path, algorithm):
    train = {"batch_size": 8, "lr": 0.05, "momentum": 0.0 if algorithm["name"] == "scaffold" else 0.9}
    job = _job(tmp_path, algorithm=algorithm, compare=[], rounds=2, train=train)
    res = runner.invoke(app, ["run", str(job), "-q"])
    assert res.exit_code == 0, res.output
    final = [r for r in _records(tmp_path / "run") if r["round"] == 2 and r["site"] == "all" and r["split"] == "test"]
    assert {r["metric"] for r in final} >= {"auc", "accuracy", "loss"}
    assert "left out" not in (tmp_path / "run" / "run.log").read_text()
    if algorithm["name"] == "qfedavg":  # each site sent its loss before training (8 bytes) with its model
        recs = _records(tmp_path / "run")
        model = {r["round"]: r["value"] for r in recs if r["metric"] == "model_bytes"}
        sent = [(r["round"], r["value"]) for r in recs if r["metric"] == "bytes_sent"]
        assert len(sent) == 6 and all(v == model[rnd] + 8 for rnd, v in sent)
    if algorithm["name"] == "ditto":
        personal = [r for r in _records(tmp_path / "run") if r["arm"] == "personalized" and r["split"] == "test"]
        assert {r["round"] for r in personal} == {1, 2} and {r["site"] for r in personal} == {"a", "b", "c", "all", "median"}


def test_pool_transport_runs_scaffold_and_centralized(tmp_path):
    # SCAFFOLD's control variates cross the process boundary through the codec
    job = _job(tmp_path, transport="pool", workers=2, threads=2, compare=["centralized"], rounds=2,
               algorithm={"name": "scaffold"}, train={"batch_size": 8, "lr": 0.05, "momentum": 0.0})
    res = runner.invoke(app, ["run", str(job), "-q"])
    assert res.exit_code == 0, res.output
    recs = _records(tmp_path / "run")
    assert {r["arm"] for r in recs} == {"federated", "centralized"}
    assert {r["site"] for r in recs if r["split"] == "test"} == {"a", "b", "c", "all", "median"}


def test_finetuned_arm_is_reported_next_to_the_global_model(tmp_path):
    job = _job(tmp_path, compare=["local", "finetuned"], finetune_epochs=2, rounds=2,
               algorithm={"name": "fedbn"})
    res = runner.invoke(app, ["run", str(job), "-q"])
    assert res.exit_code == 0, res.output
    recs = _records(tmp_path / "run")
    tuned = [r for r in recs if r["arm"] == "finetuned"]
    assert {r["round"] for r in tuned} == {2}
    assert {r["site"] for r in tuned if r["split"] == "test" and r["metric"] == "auc"} == {"a", "b", "c", "all", "median"}
    assert "finetuned" in res.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert "finetuned" in html


@pytest.mark.parametrize("seconds", ["-5", "0", "inf", "nan"])
def test_server_refuses_a_join_timeout_that_is_not_positive(tmp_path, seconds):
    job = _job(tmp_path)
    res = runner.invoke(app, ["server", "--kit", str(tmp_path / "kit"), "--job", str(job), "--join-timeout", seconds])
    assert res.exit_code == 2
    assert "Invalid value for '--join-timeout': must be > 0" in res.output  # before the kit is even looked for
