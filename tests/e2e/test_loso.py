"""`medfed loso` end to end through the command line: 3 tiny synthetic sites, 2 rounds."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medfed.cli import app

runner = CliRunner()

SITES = ["a", "b", "c"]
TINY = {
    "name": "tiny-loso",
    "seed": 5,
    "output": "PLACEHOLDER",
    "rounds": 2,
    "threads": 1,
    "data": {
        "source": "synthetic",
        "image_size": 16,
        "sites": [
            {"name": "a", "n_train": 24, "n_val": 8, "n_test": 12, "prevalence": 0.4},
            {"name": "b", "n_train": 16, "n_val": 8, "n_test": 12, "prevalence": 0.5,
             "scanner": {"intensity_scale": 1.2, "noise": 0.05}},
            {"name": "c", "n_train": 16, "n_val": 8, "n_test": 12, "prevalence": 0.3},
        ],
    },
    "model": {"name": "small_cnn", "width": 4},
    "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05},
    "compare": ["local"],
}


def _job(folder: Path, name="job.yaml", **overrides) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**TINY, "output": str(folder / "run"), **overrides}))
    return path


def _last_test_auc(run_dir: Path, arm: str, site: str):
    """The arm's test AUC for ``site`` at the arm's last round, read from metrics.jsonl
    directly (None when the run recorded none for the site)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in recs if r["arm"] == arm and r["split"] == "test")
    found = [r["value"] for r in recs if (r["arm"], r["site"], r["split"], r["metric"], r["round"])
             == (arm, site, "test", "auc", last)]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[Path, Path]:
    """The job file and the folder of one serial `medfed loso` (default output)."""
    folder = tmp_path_factory.mktemp("loso")
    job = _job(folder)
    res = runner.invoke(app, ["loso", str(job)])
    assert res.exit_code == 0, res.output
    assert "'b' left out" in res.output and "federated" in res.output
    return job, folder / "run-loso"


def test_loso_writes_each_left_out_run_the_full_run_and_the_table(serial):
    _, out = serial
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*SITES, "all", "loso.json", "loso.md", "loso.png", "run.json"])
    assert not list(out.parent.glob(".run-loso.partial-*"))
    for site in SITES:  # each an ordinary complete run with that one site held out
        job = yaml.safe_load((out / site / "job.yaml").read_text())
        assert job["held_out"] == [site] and job["output"] == str(out / site)
        assert json.loads((out / site / "run.json").read_text())["status"] == "complete"
    assert yaml.safe_load((out / "all" / "job.yaml").read_text())["held_out"] == []
    table = json.loads((out / "loso.json").read_text())
    assert table["metric"] == "auc" and table["split"] == "test" and table["full_run"] == "all"
    assert table["arms"] == ["local", "federated"]
    assert [r["site"] for r in table["sites"]] == SITES
    for row in table["sites"]:
        site = row["site"]
        for arm in ("federated", "local"):
            assert row[arm]["seen"] == _last_test_auc(out / "all", arm, site)
        assert row["federated"]["unseen"] == _last_test_auc(out / site, "federated", site)
        assert row["federated"]["seen"] is not None and row["federated"]["unseen"] is not None
        assert row["federated"]["change"] == pytest.approx(row["federated"]["unseen"] - row["federated"]["seen"])
        # a held-out site never trains: no local model, nothing recorded, no unseen figure
        assert _last_test_auc(out / site, "local", site) is None
        assert row["local"]["unseen"] is None and row["local"]["change"] is None
    assert table["notes"] and "local" in table["notes"][0]
    md = (out / "loso.md").read_text()
    assert "| a |" in md and "federated unseen" in md
    png = (out / "loso.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_parallel_gives_the_same_table_as_serial(serial, tmp_path):
    job, out = serial
    res = runner.invoke(app, ["loso", str(job), "-o", str(tmp_path / "par"), "--parallel", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "par" / "loso.json").read_bytes() == (out / "loso.json").read_bytes()
    for run in [*SITES, "all"]:  # seeded runs: bit for bit, whichever process ran them
        assert (tmp_path / "par" / run / "metrics.jsonl").read_bytes() == (out / run / "metrics.jsonl").read_bytes()


def test_with_reuses_a_run_of_the_same_job_only(serial, tmp_path):
    job, out = serial
    full = out / "all"
    res = runner.invoke(app, ["loso", str(job), "-o", str(tmp_path / "w"), "--with", str(full)])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "w" / "all").exists()
    table, before = (json.loads((p / "loso.json").read_text()) for p in (tmp_path / "w", out))
    assert table["full_run"] == str(full.resolve())
    assert table["sites"] == before["sites"] and table["mean"] == before["mean"]
    other = _job(tmp_path, "other.yaml", seed=6)
    res = runner.invoke(app, ["loso", str(other), "-o", str(tmp_path / "x"), "--with", str(full)])
    assert res.exit_code == 2 and "--with" in res.output and "another job" in res.output
    assert not (tmp_path / "x").exists()


def test_fewer_than_three_training_sites_refused(tmp_path):
    two = {**TINY["data"], "sites": TINY["data"]["sites"][:2]}
    res = runner.invoke(app, ["loso", str(_job(tmp_path, data=two))])
    assert res.exit_code == 2
    assert "data.sites" in res.output and "at least 3 training sites" in res.output and "has 2" in res.output
    res = runner.invoke(app, ["loso", str(_job(tmp_path, "held.yaml", held_out=["c"]))])
    assert res.exit_code == 2 and "has 2 (a, b)" in res.output and "held_out" in res.output
    assert not (tmp_path / "run-loso").exists()


def test_a_setting_that_needs_every_site_names_the_site_left_out(tmp_path):
    res = runner.invoke(app, ["loso", str(_job(tmp_path, sampling={"count": 3}))])
    assert res.exit_code == 2 and "site 'a' left out" in res.output and "sampling.count" in res.output


def test_existing_output_refused_and_overwrite_only_a_medfed_folder(serial, tmp_path):
    job, out = serial
    res = runner.invoke(app, ["loso", str(job), "-o", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = runner.invoke(app, ["loso", str(job), "-o", str(mine), "--overwrite"])
    assert res.exit_code == 2 and "not a medfed run" in res.output
    assert (mine / "notes.txt").read_text() == "keep"


def test_partitioned_data_holds_a_site_out_with_the_same_split(tmp_path):
    """A data set split into sites (here MedMNIST, iid) is split by the job seed over the
    whole site list, held-out sites included: each site has the same examples whether it
    trains or is left out, so loso needs no refusal for it."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in {"train": 48, "val": 24, "test": 24}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(tmp_path / "m.npz", **arrays)
    data = {"source": "medmnist", "path": str(tmp_path / "m.npz"), "partition": {"method": "iid", "sites": SITES}}
    res = runner.invoke(app, ["loso", str(_job(tmp_path, data=data, rounds=1, compare=["centralized"]))])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run-loso"

    def sizes(run: str) -> dict:
        body = json.loads((out / run / "sites.json").read_text())
        return {s["name"]: (s["train"], s["val"], s["test"], s["class_counts"]) for s in body["sites"]}

    assert all(sizes(site) == sizes("all") for site in SITES)
    table = json.loads((out / "loso.json").read_text())
    assert table["arms"] == ["federated", "centralized"] and not table["notes"]
    for row in table["sites"]:  # the pooled model never saw the left-out site either
        assert row["centralized"]["unseen"] == _last_test_auc(out / row["site"], "centralized", row["site"])


def test_each_run_of_the_study_is_tracked_once_it_is_in_place(tmp_path):
    """With a tracking section every run (the full one and each left-out one) reaches
    TensorBoard and MLflow, as it would have had it been a run of its own: event files in
    each run folder, one MLflow run each, tagged with the study and the site left out, whose
    metric history is that run's metrics.jsonl."""
    pytest.importorskip("mlflow", reason='MLflow is an optional extra: pip install -e ".[mlflow]"')
    pytest.importorskip("tensorboard", reason='TensorBoard is an optional extra: pip install -e ".[tensorboard]"')
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = _job(tmp_path, rounds=1, compare=[], tracking={"tensorboard": True, "mlflow": {}})
    res = runner.invoke(app, ["loso", str(job), "-o", str(tmp_path / "study")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "study"
    assert (out / "mlflow.db").is_file() and not list(out.glob(".*partial*"))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("tiny-loso").experiment_id])
    by_left_out = {r.data.tags["medfed.loso.left_out"]: r for r in found}
    assert sorted(by_left_out) == ["a", "b", "c", "none"]
    for left_out, run in by_left_out.items():
        folder = out / ("all" if left_out == "none" else left_out)
        assert run.info.status == "FINISHED" and run.info.run_name == folder.name
        assert run.data.tags["medfed.loso"] == "tiny-loso" and run.data.tags["medfed.run_dir"] == str(folder)
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        expected = {f"{r['arm']}/{r['split']}/{r['metric']}/{r['site']}": r["value"] for r in recs
                    if r["value"] is not None}
        assert set(run.data.metrics) == set(expected)
        assert all(abs(run.data.metrics[k] - v) < 1e-9 for k, v in expected.items())
        events = EventAccumulator(str(folder / "tensorboard"))
        events.Reload()
        assert set(events.Tags()["scalars"]) == set(expected)
    # the left-out site is evaluated but never trains in its own run
    assert "federated/test/auc/b" in by_left_out["b"].data.metrics
    assert "federated/train/loss/b" not in by_left_out["b"].data.metrics
