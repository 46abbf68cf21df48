"""`medfed compare`: run folders side by side, from their files alone (no tracking tool).
The runs are written by hand, with values whose means, best rounds and spreads are known."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medfed.cli import app
from medfed.core.errors import ConfigError, RunDirError
from medfed.tracking.compare import compare_rows, load_runs
from medfed.tracking.metrics import MetricsWriter

runner = CliRunner()

# per arm, per round: (val mean, test mean, {site: test value}); sites north and south
FEDAVG = {
    "federated": {1: (0.60, 0.60, {"north": 0.6, "south": 0.6}),
                  2: (0.80, 0.70, {"north": 0.7, "south": 0.7}),
                  3: (0.70, 0.65, {"north": 0.80, "south": 0.50})},
    "local": {1: (0.55, 0.55, {"north": 0.5, "south": 0.6}),
              2: (0.50, 0.58, {"north": 0.5, "south": 0.6}),
              3: (0.52, 0.60, {"north": 0.62, "south": 0.58})},
}
FEDPROX = {"federated": {1: (0.70, 0.72, {"north": 0.7, "south": 0.74}),
                         2: (0.75, 0.78, {"north": 0.76, "south": 0.80})}}


def make_run(folder: Path, algorithm: str, arms: dict, task=None, job_hash="a" * 64) -> Path:
    folder.mkdir(parents=True)
    job = {"name": folder.name, "output": str(folder), "rounds": max(max(r) for r in arms.values()),
           "algorithm": {"name": algorithm}, "task": task or {"labels": "binary", "monitor": "auc"},
           "data": {"source": "synthetic", "sites": [{"name": "north"}, {"name": "south"}]}}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    (folder / "run.json").write_text(json.dumps({"status": "complete", "job_hash": job_hash}))
    with MetricsWriter(folder / "metrics.jsonl") as m:
        for arm, rounds in arms.items():
            for rnd, (val, test, sites) in rounds.items():
                m.write(rnd, arm, "all", "val", "auc", val)
                m.write(rnd, arm, "all", "test", "auc", test)
                for site, v in sites.items():
                    m.write(rnd, arm, site, "test", "auc", v)
                    m.write(rnd, arm, site, "train", "loss", 1.0 / rnd)
    return folder


@pytest.fixture
def two_runs(tmp_path):
    return (make_run(tmp_path / "avg", "fedavg", FEDAVG, job_hash="1" * 64),
            make_run(tmp_path / "prox", "fedprox", FEDPROX, job_hash="2" * 64))


def test_rows_hold_the_final_and_best_val_means_and_the_spread(two_runs):
    rows = compare_rows(load_runs(two_runs), "auc", "test")
    assert [(r["run"], r["method"], r["arm"]) for r in rows] == [
        ("avg", "local", "local"), ("avg", "fedavg", "federated"), ("prox", "fedprox", "federated")]
    local, fed, prox = rows
    assert fed["round"] == 3 and fed["final"] == 0.65
    assert fed["best_round"] == 2 and fed["at_best"] == 0.70  # val mean best at round 2
    assert local["best_round"] == 1 and local["at_best"] == 0.55
    sp = fed["spread"]
    assert sp.worst == ("south", 0.50) and sp.best == ("north", 0.80)
    assert sp.std == pytest.approx(0.15) and sp.gap == pytest.approx(0.30)
    assert prox["final"] == 0.78 and prox["job_hash"] == "2" * 64


def test_compare_prints_both_runs_and_writes_the_figure(two_runs, tmp_path):
    out = tmp_path / "figs" / "cmp.png"
    res = runner.invoke(app, ["compare", *map(str, two_runs), "-o", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("avg", "prox", "fedavg", "fedprox", "local", "0.650", "0.700 (r2)", "0.500 (south)", "0.800 (north)",
                 "0.150", "0.300", "0.780", "111111111111", "222222222222"):
        assert text in res.output, text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_takes_another_metric_and_split_and_a_folder_for_the_figure(two_runs, tmp_path):
    res = runner.invoke(app, ["compare", *map(str, two_runs), "--metric", "loss", "--split", "train",
                              "-o", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "train loss" in res.output and (tmp_path / "compare.png").is_file()
    fed = compare_rows(load_runs(two_runs), "loss", "train")[1]
    assert fed["final"] == pytest.approx(1 / 3)  # no "all" record: the plain mean of the sites


def _error(*args: str) -> str:
    res = runner.invoke(app, ["compare", *args], env={"COLUMNS": "300"})
    assert res.exit_code == 2, res.output
    return " ".join(res.output.split())


def test_a_folder_that_is_not_a_run_is_named(two_runs, tmp_path):
    assert f"'{tmp_path / 'nowhere'}' is not a run folder: no such folder" in _error(str(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    assert f"'{tmp_path / 'plain'}' is not a run folder written by medfed: it has no readable run.json" in _error(
        str(two_runs[0]), str(tmp_path / "plain"))
    assert "it holds run folders (avg, prox): name them" in _error(str(tmp_path))
    (two_runs[1] / "metrics.jsonl").unlink()
    assert f"'{two_runs[1]}' is not a complete run folder: it has no metrics.jsonl" in _error(*map(str, two_runs))
    loso = tmp_path / "loso"
    loso.mkdir()
    (loso / "run.json").write_text(json.dumps({"status": "complete", "kind": "loso", "sites": ["a", "b"]}))
    assert "is a leave-one-site-out folder, not a run" in _error(str(loso))


def test_a_metric_a_run_lacks_names_the_metrics_it_has(two_runs):
    msg = _error(*map(str, two_runs), "--metric", "dice")
    assert "run 'avg'" in msg and "has no metric 'dice' on the test split; its test metrics: auc" in msg
    msg = _error(*map(str, two_runs), "--metric", "loss", "--split", "val")
    assert "has no metric 'loss' on the val split; its val metrics: auc" in msg
    assert "--split: must be train, val or test, got 'dev'" in _error(*map(str, two_runs), "--split", "dev")


def test_runs_of_different_tasks_are_refused(two_runs, tmp_path):
    seg = make_run(tmp_path / "seg", "fedavg", FEDPROX, task={"kind": "segmentation", "num_classes": 3})
    msg = _error(str(two_runs[0]), str(seg))
    assert "the runs do not share a task" in msg and "'avg' is binary classification, 'seg' is segmentation (3 classes)" in msg
    with pytest.raises(ConfigError, match="given twice"):
        load_runs([two_runs[0], two_runs[0]])
    with pytest.raises(RunDirError):
        load_runs([tmp_path])


def test_compare_reads_real_run_folders(tmp_path):
    from medfed.config import parse_job
    from medfed.server.runner import run_job

    base = {"name": "pair", "seed": 2, "rounds": 2, "threads": 1, "model": {"name": "small_cnn", "width": 4},
            "task": {"labels": "binary"}, "train": {"batch_size": 8, "lr": 0.05},
            "data": {"source": "synthetic", "image_size": 16, "sites": [
                {"name": "a", "n_train": 24, "n_val": 8, "n_test": 10}, {"name": "b", "n_train": 16, "n_val": 8, "n_test": 10}]}}
    runs = [run_job(parse_job({**base, "output": str(tmp_path / name), "algorithm": {"name": algo}})).run_dir
            for name, algo in (("avg", "fedavg"), ("prox", "fedprox"))]
    res = runner.invoke(app, ["compare", *map(str, runs), "-o", str(tmp_path / "c.png")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = compare_rows(load_runs(runs), "auc")
    assert [(r["run"], r["method"], r["round"]) for r in rows] == [("avg", "fedavg", 2), ("prox", "fedprox", 2)]
    for r in rows:
        assert f"{r['final']:.3f}" in res.output and r["job_hash"][:12] in res.output
    assert (tmp_path / "c.png").stat().st_size > 1000
