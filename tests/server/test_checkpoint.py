import json

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
