"""A deployment whose sites read image files, each its own way: one streams them with two
forked loader workers inside the gRPC site process, one from its disk cache, one holds
them in memory. The deployed model equals the simulation's (in memory) bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from deploy_kits import SITES, make_kits, start, stop
from medfed.config import load_job
from medfed.server.runner import run_job

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

READING = {"hospital_a": {"cache": "none", "loader": {"workers": 2}},
           "hospital_b": {"cache": "disk", "loader": {"workers": 0}},
           "hospital_c": {"cache": "memory"}}


def _images(root: Path, site: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / site
    folder.mkdir(parents=True)
    rows = ["file,label"]
    for i in range(n):
        label = i % 2
        Image.fromarray((rng.random((16, 16)) * 110 + label * 90).astype(np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"name": site, "images": str(folder), "csv": str(folder / "labels.csv")}


def test_sites_streaming_their_files_train_the_simulated_model(tmp_path):
    sites = [_images(tmp_path / "data", s, n, i) for i, (s, n) in enumerate(zip(SITES, (40, 30, 50)))]
    data = {"source": "folder", "label_columns": ["label"], "sites": sites}
    job = tmp_path / "deployed.yaml"
    job.write_text(yaml.safe_dump({
        "name": "files", "output": str(tmp_path / "deployed"), "rounds": 2, "seed": 5, "threads": 1,
        "round_timeout": 60, "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
        "train": {"local_epochs": 1, "batch_size": 8}, "transforms": {"augment": [{"name": "flip"}]},
        "compare": ["local"], "data": data,
    }))
    kits, port = make_kits(tmp_path)
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    procs = {}
    for site in sites:
        own = tmp_path / f"{site['name']}-data.yaml"
        own.write_text(yaml.safe_dump({"data": {**data, **READING[site["name"]], "sites": [site],
                                                "cache_dir": str(tmp_path / f"cache-{site['name']}")}}))
        procs[site["name"]] = start(["site", "--kit", str(kits / site["name"]), "--data", str(own),
                                     "--give-up-after", "120"], tmp_path / f"{site['name']}.log")
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for s, p in procs.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *procs.values())
    deployed = load_file(str(tmp_path / "deployed" / "model_final.safetensors"))
    simulated = run_job(load_job(job).model_copy(update={"output": tmp_path / "simulated"})).run_dir
    expected = load_file(str(simulated / "model_final.safetensors"))
    assert deployed.keys() == expected.keys() and all(torch.equal(deployed[k], expected[k]) for k in deployed)
    assert len(list((tmp_path / "cache-hospital_b" / "hospital_b").glob("*.pt"))) == 30
