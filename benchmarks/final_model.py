"""What the update-path benchmarks (robustness.py, compression.py, privacy.py) share: the
jobs robustness.py and compression.py run, and what they read of a finished run (the final
federated model's test figures, and whether it outputs NaN). Imported by those scripts
(run as ``python benchmarks/<name>.py``, this folder is on the path)."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from medfed.config import parse_job
from medfed.server.checkpoint import load_checkpoint
from medfed.server.runner import initial_model

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"


def data_section(name: str, n_sites: int, n_train: int, n_test: int) -> dict:
    """A job's ``data`` section: ``n_sites`` synthetic sites of ``n_train`` / 20 / ``n_test``
    images (``name`` "synthetic"), or BreastMNIST split i.i.d. over ``n_sites`` sites."""
    sites = [f"site{i}" for i in range(n_sites)]
    if name == "synthetic":
        return {"source": "synthetic", "image_size": 28,
                "sites": [{"name": s, "n_train": n_train, "n_val": 20, "n_test": n_test, "prevalence": 0.4}
                          for s in sites]}
    return {"source": "medmnist", "path": str(BREAST), "partition": {"method": "iid", "sites": sites}}


def small_cnn_job(name: str, data: dict, rounds: int, epochs: int, out: Path, seed: int, threads: int,
                  **sections: dict | None):
    """A binary small_cnn job that evaluates its final model only (the benchmarks read
    nothing else), with the update-path ``sections`` that are not None (robust, attack,
    compression...)."""
    raw = {
        "name": name, "seed": seed, "output": str(out), "rounds": rounds, "threads": threads, "device": "cpu",
        "eval_every": rounds,
        "data": data, "model": {"name": "small_cnn", "width": 16},
        "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": epochs, "batch_size": 32, "lr": 0.02, "momentum": 0.9},
    }
    raw.update({k: v for k, v in sections.items() if v is not None})
    return parse_job(raw)


def final_test_means(recs: list[dict]) -> dict:
    """Mean over the sites (not "all") of the federated model's test AUC and accuracy at
    its last evaluated round; sites where a metric is undefined are left out of its mean."""
    test = [r for r in recs if r["arm"] == "federated" and r["split"] == "test" and r["site"] != "all"]
    last = max(r["round"] for r in test)
    auc = [r["value"] for r in test if r["round"] == last and r["metric"] == "auc" and r["value"] is not None]
    acc = [r["value"] for r in test if r["round"] == last and r["metric"] == "accuracy" and r["value"] is not None]
    return {"auc": statistics.mean(auc) if auc else None, "acc": statistics.mean(acc) if acc else None,
            "auc_sites": len(auc), "round": last}


def nan_outputs(job, run_dir: Path, sites) -> tuple[int, int, int]:
    """Test images (over all sites) for which the final federated model outputs NaN, how
    many there are, and the number of negative batch-norm running variances in it."""
    params = load_checkpoint(run_dir / "model_final")[0]
    negative = sum(int((v < 0).sum()) for k, v in params.items() if k.endswith("running_var"))
    model = initial_model(job, sites[0].test.images.shape[1])
    model.load_state_dict(params)
    model.eval()
    with torch.no_grad():
        nan = sum(int(torch.isnan(model(s.test.images)).any(dim=1).sum()) for s in sites)
    return nan, sum(len(s.test.images) for s in sites), negative


def data_sets(arg: str, error) -> list[str]:
    """The data sets named in ``--data`` (``error``: the argument parser's), less
    BreastMNIST when its file is absent (said so)."""
    out = []
    for name in [d for d in arg.split(",") if d]:
        if name not in ("synthetic", "breastmnist"):
            error(f"--data: unknown data set {name!r}; choose from synthetic, breastmnist")
        if name == "breastmnist" and not BREAST.is_file():
            print(f"skipping breastmnist: {BREAST} not found", flush=True)
            continue
        out.append(name)
    return out
