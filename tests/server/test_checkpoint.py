import json
from pathlib import Path

import pytest
import torch

from medfed.server.checkpoint import load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_and_no_temporary_files(tmp_path):
    params = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7)}
    meta = {"round": 3, "metric": "val_auc", "value": 0.8, "job_hash": "ab" * 32}
    save_checkpoint(tmp_path / "model_best", params, meta)
    back, side = load_checkpoint(tmp_path / "model_best")
    assert side == meta and json.loads((tmp_path / "model_best.json").read_text()) == meta
    assert torch.equal(back["w"], params["w"]) and back["n"].dtype == torch.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.json", "model_best.safetensors"]


def test_temporary_files_are_new_files_under_random_names(tmp_path):
    """A file planted under the old predictable temporary names (here a link to a file
    the run must never write) is neither written through nor reused."""
    from medfed.server.deploy import STATE_FILE, save_state

    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = ("model_best.tmp.safetensors", "model_best.json.tmp", STATE_FILE + ".tmp")
    for name in planted:
        (tmp_path / name).symlink_to(victim)
    params = {"w": torch.ones(3)}
    save_checkpoint(tmp_path / "model_best", params, {"round": 1})
    save_state(tmp_path, 1, params, {"c": torch.zeros(2)}, "ab" * 32)
    assert victim.read_text() == "precious"
    assert all((tmp_path / n).is_symlink() and (tmp_path / n).resolve() == victim for n in planted)  # untouched
    assert not (tmp_path / STATE_FILE).is_symlink() and not (tmp_path / "model_best.safetensors").is_symlink()
    assert torch.equal(load_checkpoint(tmp_path / "model_best")[0]["w"], params["w"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    from medfed.server import checkpoint

    save_checkpoint(tmp_path / "model_final", {"w": torch.ones(2)}, {"round": 1})
    names: list[str] = []

    def half_written(tensors, filename, metadata=None):
        names.append(filename)
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    for _ in range(2):
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path / "model_final", {"w": torch.zeros(2)}, {"round": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.json", "model_final.safetensors"]
    assert load_checkpoint(tmp_path / "model_final")[1] == {"round": 1}
    assert names[0] != names[1]  # a fresh random name each time
    assert all(Path(n).parent == tmp_path for n in names)  # in the same folder, so os.replace is atomic


def test_the_run_checkpoints_every_round_hashing_the_job_once(tmp_path, monkeypatch):
    """The job hash serializes the whole job, every site of it: the per-round checkpoint
    takes it from the start of the run, so a round's cost does not grow with the sites."""
    from medfed.config import Job, parse_job
    from medfed.core.types import Arm
    from medfed.server.loop import RoundSummary
    from medfed.server.runner import _BestTracker

    job = parse_job({
        "name": "t", "output": str(tmp_path / "out"), "rounds": 3,
        "data": {"source": "synthetic", "image_size": 16,
                 "sites": [{"name": f"s{i}", "n_train": 4, "n_val": 2, "n_test": 2} for i in range(3)]},
        "model": {"name": "small_cnn", "width": 2}, "task": {"labels": "binary"},
    })
    expected = job.job_hash()
    calls = []
    real = Job.job_hash
    monkeypatch.setattr(Job, "job_hash", lambda self: calls.append(1) or real(self))
    tracker = _BestTracker(tmp_path, job)
    for rnd in (1, 2, 3):
        tracker(RoundSummary(Arm.FEDERATED, rnd, 0.5, {"val": {"auc": 0.1 * rnd}}), {"w": torch.ones(2)})
    assert len(calls) == 1
    for stem in ("model_final", "model_best"):
        assert load_checkpoint(tmp_path / stem)[1]["job_hash"] == expected
        assert load_checkpoint(tmp_path / stem)[1]["round"] == 3
