"""What the update-path benchmarks (robustness.py, compression.py, privacy.py) read of a
finished run: the final federated model's test figures, and whether it outputs NaN.
Imported by those scripts (run as ``python benchmarks/<name>.py``, this folder is on the
path)."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from medfed.server.checkpoint import load_checkpoint
from medfed.server.runner import initial_model

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"


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
