"""Scarce labels: supervised-only FedAvg against FedAvg with a mean teacher and with
FixMatch (semi_supervised), and against SimCLR- (or BYOL-) pretrained FedAvg fine-tuned on
the labels (pretrain), when each site keeps only a share of its training labels.

Usage: python benchmarks/scarce_labels.py [--fractions 0.05,0.1,0.25,1] [--seeds 0,1,2]
           [--rounds 20] [--pretrain-rounds 20] [--settings feature-shift,breastmnist]
           [--methods supervised,mean_teacher,fixmatch,simclr]   (byol too)

Settings (the model, budget and data of benchmarks/algorithms.py: small CNN of width 16,
``rounds`` rounds of 1 local epoch, SGD lr 0.02 with momentum 0.9, batches of 32):
  feature-shift  4 synthetic sites, 250 train images each, prevalence 0.4, strongly
                 different scanners.
  breastmnist    BreastMNIST (../shared/data/medmnist/breastmnist.npz), 3 sites, Dirichlet
                 alpha 0.5; skipped with a message when the file is absent.
Every site keeps ``data.labeled_fraction`` of its training labels (a seeded choice; val
and test keep all theirs). ``supervised`` trains on the labeled images only; the other
two also on the unlabeled ones: mean teacher (weight 10, ema 0.99, rampup 5 rounds) and
FixMatch (threshold 0.95, weight 1). ``simclr`` and ``byol`` first run ``--pretrain-rounds``
FedAvg rounds of self-supervised training on every training image of every site (labels
unused; SimCLR at temperature 0.5, BYOL with target decay 0.99; the default views), then the
same supervised rounds as ``supervised`` from the pretrained encoder (the head as
initialized). For each setting, fraction, method and seed it
records the mean over sites of the test AUC at the last round, and prints a Markdown
table of its mean +- standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from algorithms import SCANNERS  # the feature-shift scanners of benchmarks/algorithms.py

from medfed.config import parse_job
from medfed.server.runner import run_job
from medfed.site.device import set_threads

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"

METHODS: dict[str, dict | None] = {  # semi_supervised sections
    "supervised": None,
    "mean_teacher": {"method": "mean_teacher", "weight": 10.0, "ema": 0.99, "rampup_rounds": 5},
    "fixmatch": {"method": "fixmatch", "threshold": 0.95, "weight": 1.0},
}
PRETRAIN: dict[str, dict] = {  # pretrain sections (then supervised FedAvg from the pretrained encoder)
    "simclr": {"method": "simclr", "temperature": 0.5},
    "byol": {"method": "byol", "ema": 0.99},
}



def data_for(setting: str, fraction: float) -> dict:
    if setting == "feature-shift":
        sites = [{"name": f"site{i}", "n_train": 250, "n_val": 50, "n_test": 150, "prevalence": 0.4, "scanner": sc}
                 for i, sc in enumerate(SCANNERS)]
        return {"source": "synthetic", "image_size": 28, "sites": sites, "labeled_fraction": fraction}
    return {"source": "medmnist", "path": str(BREAST), "labeled_fraction": fraction,
            "partition": {"method": "dirichlet", "alpha": 0.5, "sites": ["site0", "site1", "site2"]}}


def job_for(setting: str, fraction: float, method: str, seed: int, rounds: int, out: Path,
            pretrain_rounds: int = 20):
    raw = {
        "name": f"{setting}-{fraction:g}-{method}-{seed}", "seed": seed, "output": str(out), "rounds": rounds,
        "threads": 2, "device": "cpu", "data": data_for(setting, fraction),
        "model": {"name": "small_cnn", "width": 16}, "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "momentum": 0.9},
    }
    if method in PRETRAIN:
        raw["pretrain"] = {**PRETRAIN[method], "rounds": pretrain_rounds}
    elif METHODS[method] is not None:
        raw["semi_supervised"] = METHODS[method]
    return parse_job(raw)


def test_auc(run: Path, rounds: int) -> float | None:
    """The mean over sites of the federated model's test AUC at the last round."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r["value"] for r in recs if r["arm"] == "federated" and r["split"] == "test" and r["metric"] == "auc"
              and r["round"] == rounds and r["site"] not in ("all", "median") and r["value"] is not None]
    return sum(values) / len(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.05,0.1,0.25,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settings", default="feature-shift,breastmnist")
    ap.add_argument("--methods", default=",".join([*METHODS, "simclr"]))
    ap.add_argument("--pretrain-rounds", type=int, default=20, help="rounds of the self-supervised stage (simclr, byol)")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS and m not in PRETRAIN]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {[*METHODS, *PRETRAIN]}")
    set_threads(2)
    results: dict[tuple[str, float, str], list[float]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            if setting == "breastmnist" and not BREAST.is_file():
                print(f"skipping breastmnist: {BREAST} not found")
                continue
            for fraction in fractions:
                for method in methods:
                    for seed in seeds:
                        out = Path(tmp) / f"{setting}-{fraction:g}-{method}-{seed}"
                        run_job(job_for(setting, fraction, method, seed, args.rounds, out, args.pretrain_rounds))
                        auc = test_auc(out, args.rounds)
                        if auc is not None:
                            results.setdefault((setting, fraction, method), []).append(auc)
                        print(f"  {setting} fraction {fraction:g} {method} seed {seed}: test AUC "
                              f"{'–' if auc is None else f'{auc:.3f}'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    pre = [m for m in methods if m in PRETRAIN]
    print(f"\nrounds {args.rounds}" + (f" (after {args.pretrain_rounds} self-supervised rounds for {', '.join(pre)})"
                                       if pre else "")
          + f", seeds {seeds}; test AUC of the federated model at the last round, mean over sites, then mean ± std "
          "over seeds\n")
    print("| setting | labeled fraction | " + " | ".join(methods) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in methods) + " |")
    for setting in args.settings.split(","):
        for fraction in fractions:
            cells = []
            for method in methods:
                v = results.get((setting, fraction, method), [])
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}" if v else "–")
            if any(c != "–" for c in cells):
                print(f"| {setting} | {fraction:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
