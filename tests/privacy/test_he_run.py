"""A short federated run with privacy.he ends where the same run without it does (within
CKKS's precision), in process and with sites in worker processes."""

import pytest
import torch

pytest.importorskip("tenseal", reason='homomorphic aggregation is an optional extra: pip install -e ".[he]"')

import medfed
from medfed.server.checkpoint import load_checkpoint

SITES = (("a", 12), ("b", 20), ("c", 8))


def _job(out, he: bool, transport: str = "inprocess") -> dict:
    job = {
        "name": "he", "output": str(out), "rounds": 2, "seed": 3, "device": "cpu", "transport": transport,
        "data": {"source": "synthetic", "sites": [{"name": n, "n_train": k, "n_test": 4} for n, k in SITES]},
        "model": {"name": "small_cnn", "width": 4, "norm": "group"}, "task": {"labels": "binary"},
        "train": {"local_epochs": 1, "batch_size": 4},
    }
    if he:
        job["privacy"] = {"he": {"decryptors": 2}}
    return job


def _final(job) -> dict[str, torch.Tensor]:
    result = medfed.run(job, progress=False)
    params, _ = load_checkpoint(result.run_dir / "model_final")
    return params


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_run_with_he_ends_where_the_plain_run_does(tmp_path):
    plain = _final(_job(tmp_path / "plain", he=False))
    encrypted = _final(_job(tmp_path / "he", he=True))
    assert _max_diff(plain, encrypted) < 1e-4
    pooled = _final(_job(tmp_path / "he-pool", he=True, transport="pool"))  # sites in worker processes
    assert _max_diff(plain, pooled) < 1e-4
