"""The output folder: --overwrite replaces only a run medfed wrote, never a user's files,
the current folder, the home folder or a folder above them."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medfed.cli import app
from medfed.core.errors import RunDirError
from medfed.server import runner as run_mod
from medfed.server.runner import RUN_MARKER, check_output, check_replaceable

cli = CliRunner()

JOB = {
    "name": "tiny", "seed": 1, "output": "PLACEHOLDER", "rounds": 1, "threads": 1,
    "data": {"source": "synthetic", "image_size": 16,
             "sites": [{"name": "a", "n_train": 8, "n_val": 4, "n_test": 4},
                       {"name": "b", "n_train": 8, "n_val": 4, "n_test": 4}]},
    "model": {"name": "small_cnn", "width": 2},
    "task": {"labels": "binary"},
    "train": {"batch_size": 4},
    "compare": [],
}


def _job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, "output": str(tmp_path / "unused")}))
    return path


def _user_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "scan.dcm").write_text("pixels")
    return {"thesis.tex": "years of work", "data/scan.dcm": "pixels"}


def _intact(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


def test_overwrite_refuses_a_folder_of_user_files(tmp_path):
    job = _job(tmp_path)
    target = tmp_path / "mine"
    files = _user_files(target)
    res = cli.invoke(app, ["run", str(job), "-q", "-o", str(target), "--overwrite"])
    assert res.exit_code == 2, res.output
    assert "not a medfed run" in res.output and str(target) in res.output
    assert _intact(target, files)
    assert not list(tmp_path.glob(".mine.*"))  # no staging left behind


@pytest.mark.parametrize("output", [".", "", "..", "HOME", "/"])
def test_overwrite_never_takes_the_current_or_home_folder(tmp_path, monkeypatch, output):
    home = tmp_path / "home"
    work = home / "project"
    files = _user_files(work)
    (work / RUN_MARKER).write_text("{}")  # even a folder that looks like a run
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    job = _job(tmp_path)
    output = str(home) if output == "HOME" else output
    res = cli.invoke(app, ["run", str(job), "-q", "-o", output, "--overwrite"])
    assert res.exit_code == 2, res.output
    assert "current folder, the home folder or a folder above them" in res.output
    assert _intact(work, files)


def test_an_empty_current_folder_is_not_moved_away(tmp_path, monkeypatch):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(RunDirError, match="current folder"):
        check_replaceable(Path("."))
    assert work.is_dir() and Path.cwd() == work


def test_check_output_rules(tmp_path):
    check_output(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False)  # empty: fine
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text("{}")
    with pytest.raises(RunDirError, match="already holds a run.*--overwrite"):
        check_output(run, overwrite=False)
    check_output(run, overwrite=True)  # a run medfed wrote: replaceable
    _user_files(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="not a medfed run"):
            check_output(tmp_path / "mine", overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a folder"):
        check_output(tmp_path / "file", overwrite=True)


def test_overwrite_replaces_a_run_medfed_wrote(tmp_path):
    job = _job(tmp_path)
    target = tmp_path / "run"
    assert cli.invoke(app, ["run", str(job), "-q", "-o", str(target)]).exit_code == 0
    (target / "stale.txt").write_text("from the old run")
    res = cli.invoke(app, ["run", str(job), "-q", "-o", str(target), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (target / "stale.txt").exists()
    assert json.loads((target / RUN_MARKER).read_text())["status"] == "complete"
    assert not list(tmp_path.glob(".run.*"))


def test_a_folder_that_changes_while_the_job_runs_is_not_replaced(tmp_path, monkeypatch):
    job = _job(tmp_path)
    target = tmp_path / "run"
    assert cli.invoke(app, ["run", str(job), "-q", "-o", str(target)]).exit_code == 0
    files: dict[str, str] = {}
    real = run_mod.move_into_place

    def meanwhile(staging, output):  # the user swaps the run for their own files during the run
        (output / RUN_MARKER).unlink()
        files.update(_user_files(output))
        return real(staging, output)

    monkeypatch.setattr(run_mod, "move_into_place", meanwhile)
    res = cli.invoke(app, ["run", str(job), "-q", "-o", str(target), "--overwrite"])
    assert res.exit_code == 2, res.output
    assert "nothing was replaced" in res.output
    assert _intact(target, files)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    job = _job(tmp_path)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_mod, "save_checkpoint", full)
    res = cli.invoke(app, ["run", str(job), "-q", "-o", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "cannot write the run" in res.output and "No space left on device" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))
