"""What privacy costs: final test AUC, epsilon spent and seconds per round for FedAvg with
each privacy setting, side by side on one data set.

Usage: python benchmarks/privacy.py [--quick] [--rounds N] [--out FOLDER]

Settings (every run: the same synthetic data, model, seed and local training):

  none                        plain FedAvg
  secure aggregation          the server sees only the sum (threshold 3 of 4)
  site-level DP, central      DP-FedAvg, clip 1.0, server noise, z = 1 and z = 4
  site-level DP, local        DP-FedAvg, clip 1.0, each site adds noise, z = 4
  DP-SGD                      Opacus at every site, max_grad_norm 1.0, z = 0.8 and z = 1.5

Data: 4 synthetic sites of 200 training, 40 val and 100 test images (28x28, prevalence
0.4, one scanner); small CNN width 16 with group norm (DP-SGD needs it; the other
settings use it too, so that only the privacy differs); SGD lr 0.02, momentum 0.9, batch
32, 1 local epoch; delta 1e-5; every site in every round (no sampling amplification). No
budget: each run does all its rounds and reports the epsilon it reached. 1 thread.
``--quick`` runs 2 rounds on smaller sites (a smoke test, not results). A one-round
warm-up run goes first, untimed. Seconds per round include the evaluation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from final_model import final_test_means
from medfed.config import parse_job
from medfed.server.runner import run_job
from medfed.tracking.metrics import read_metrics

SITES = [f"site{i}" for i in range(4)]
DELTA = 1e-5
SETTINGS: dict[str, dict] = {
    "none": {},
    "secure aggregation": {"secure_aggregation": {"threshold": 3}},
    "site-level DP, central, z=1": {"dp": {"noise": "central", "noise_multiplier": 1.0, "clip": 1.0, "delta": DELTA}},
    "site-level DP, central, z=4": {"dp": {"noise": "central", "noise_multiplier": 4.0, "clip": 1.0, "delta": DELTA}},
    "site-level DP, local, z=4": {"dp": {"noise": "local", "noise_multiplier": 4.0, "clip": 1.0, "delta": DELTA}},
    "DP-SGD, z=0.8": {"dp_sgd": {"noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": DELTA}},
    "DP-SGD, z=1.5": {"dp_sgd": {"noise_multiplier": 1.5, "max_grad_norm": 1.0, "delta": DELTA}},
}


def make_job(name: str, privacy: dict, rounds: int, quick: bool, out: Path):
    n_train = 60 if quick else 200
    return parse_job({
        "name": name, "seed": 0, "output": str(out), "rounds": rounds, "threads": 1, "device": "cpu",
        "eval_every": rounds,
        "data": {"source": "synthetic", "image_size": 28,
                 "sites": [{"name": s, "n_train": n_train, "n_val": 40, "n_test": 100, "prevalence": 0.4} for s in SITES]},
        "model": {"name": "small_cnn", "width": 16, "norm": "group"},
        "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "momentum": 0.9},
        "privacy": privacy,
    })


def summarize(run_dir: Path, rounds: int) -> dict:
    recs = read_metrics(run_dir / "metrics.jsonl")
    eps = [r["value"] for r in recs if r["metric"] == "epsilon" and r["round"] == rounds]
    return {**final_test_means(recs), "epsilon": eps[0] if eps else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 10)
    out = args.out or Path(tempfile.mkdtemp(prefix="medfed-privacy-"))
    run_job(make_job("warmup", {}, 1, True, out / "warmup"))  # imports and first-call costs, not timed
    results = {}
    for i, (name, privacy) in enumerate(SETTINGS.items()):
        t0 = time.perf_counter()
        run_dir = run_job(make_job(f"privacy{i}", privacy, rounds, args.quick, out / f"run{i}")).run_dir
        took = time.perf_counter() - t0
        results[name] = {**summarize(run_dir, rounds), "s_per_round": took / rounds}
        r = results[name]
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        print(f"[{i + 1}/{len(SETTINGS)}] {name}: AUC {r['auc']:.3f}, epsilon {eps}, {took:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    base = results["none"]
    print()
    print(f"{rounds} rounds, delta {DELTA:g}; AUC and accuracy: final federated model, mean over the 4 sites' test sets")
    print()
    print("| setting | epsilon | test AUC | change | test accuracy | s per round | time vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        print(f"| {name} | {eps} | {r['auc']:.3f} | {r['auc'] - base['auc']:+.3f} | {r['acc']:.3f} | "
              f"{r['s_per_round']:.1f} | {r['s_per_round'] / base['s_per_round']:.1f}x |")


if __name__ == "__main__":
    main()
