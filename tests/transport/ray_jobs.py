"""A small job run in process and on Ray, and what two runs must share (the Ray tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from medfed.config import parse_job
from medfed.server.runner import run_job


def job_dict(out: Path, **over) -> dict:
    """Three synthetic sites, small_cnn of width 4, 2 rounds, 1 thread (each Ray actor
    trains with 1 thread too: cpus_per_site 1), compared with the centralized arm."""
    d = {
        "name": "ray", "output": str(out), "rounds": 2, "threads": 1, "seed": 3,
        "data": {"source": "synthetic", "image_size": 16, "sites": [
            {"name": "a", "n_train": 20, "n_val": 4, "n_test": 6},
            {"name": "b", "n_train": 12, "n_val": 4, "n_test": 6},
            {"name": "c", "n_train": 8, "n_val": 4, "n_test": 6},
        ]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"}, "train": {"batch_size": 4},
        "compare": ["centralized"],
    }
    d.update(over)
    return d


def run(out: Path, **over) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The records of metrics.jsonl and the final model's tensors of a run of the job."""
    run_job(parse_job(job_dict(out, **over)))
    return read_run(out)


def read_run(out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The records of metrics.jsonl and the final model's tensors of the run in ``out``."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(out / "model_final.safetensors")


def assert_same(a: tuple[list[dict], dict[str, torch.Tensor]], b: tuple[list[dict], dict[str, torch.Tensor]]) -> None:
    """The same metrics, record for record, and the same final model, bit for bit."""
    assert len(a[0]) > 0 and a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
