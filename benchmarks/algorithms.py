"""Every implemented algorithm against local and centralized training, under feature
shift, label skew and (when ../shared/data is present) BreastMNIST split into sites.

Usage: python benchmarks/algorithms.py [--seeds 0,1,2] [--rounds 20] [--methods fedavg,fedbn]

Settings (same model, small CNN; same budget: ``rounds`` rounds of 1 local epoch, SGD lr
0.02 with momentum 0.9, except SCAFFOLD, which needs plain SGD, momentum 0):
  feature-shift  4 synthetic sites, 250 train images each, prevalence 0.4, and strongly
                 different scanners (gain, offset, contrast, blur, noise).
  label-skew     4 synthetic sites with the same scanner and label prevalences drawn from
                 Dirichlet(0.1) over the sites for each class (clipped to [0.03, 0.97]).
  breastmnist    BreastMNIST, 3 sites, Dirichlet alpha 0.5 (skipped without the file).
For each setting, method and seed it records the per-site test AUC and accuracy at the
last round; it prints a Markdown table of the mean over seeds of the site-mean, its
spread (standard deviation over seeds), the worst site, and the first round at which
the mean test AUC over sites reached the target (0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from medfed.config import parse_job
from medfed.server.runner import run_job
from medfed.site.device import set_threads

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
TARGET = 0.8

METHODS = {
    "fedavg": {"name": "fedavg"},
    "fedprox (mu 0.01)": {"name": "fedprox", "mu": 0.01},
    "fedavgm (beta 0.9, lr 1)": {"name": "fedavgm", "beta1": 0.9, "server_lr": 1.0},
    "fedadam (lr 0.01)": {"name": "fedadam", "server_lr": 0.01},
    "fedyogi (lr 0.01)": {"name": "fedyogi", "server_lr": 0.01},
    "fedadagrad (lr 0.01)": {"name": "fedadagrad", "server_lr": 0.01},
    "scaffold (plain SGD)": {"name": "scaffold"},
    "fedbn": {"name": "fedbn"},
    "fednova": {"name": "fednova"},
    "feddyn (alpha 0.01)": {"name": "feddyn", "alpha": 0.01},
    "fedper (personal head)": {"name": "fedper", "personal_layers": ["head"]},
    "ditto (lam 0.1)": {"name": "ditto", "lam": 0.1},
    "moon (mu 1, tau 0.5)": {"name": "moon", "mu": 1.0, "tau": 0.5},
    "fedrep (personal head, 1 head epoch)": {"name": "fedrep", "personal_layers": ["head"], "head_epochs": 1},
}

SCANNERS = [
    {"intensity_scale": 1.0, "intensity_offset": 0.0, "contrast": 1.0, "noise": 0.03, "blur": 0.0},
    {"intensity_scale": 1.6, "intensity_offset": 0.15, "contrast": 0.7, "noise": 0.05, "blur": 0.8},
    {"intensity_scale": 0.6, "intensity_offset": -0.05, "contrast": 1.5, "noise": 0.10, "blur": 0.4},
    {"intensity_scale": 1.2, "intensity_offset": 0.3, "contrast": 1.2, "noise": 0.08, "blur": 1.2},
]


def data_for(setting: str, seed: int) -> dict:
    if setting == "feature-shift":
        sites = [{"name": f"site{i}", "n_train": 250, "n_val": 50, "n_test": 150, "prevalence": 0.4, "scanner": sc}
                 for i, sc in enumerate(SCANNERS)]
        return {"source": "synthetic", "image_size": 28, "sites": sites}
    if setting == "label-skew":
        rng = np.random.default_rng([seed, 31337])
        share = rng.dirichlet(np.full(4, 0.1), size=2)  # class x site
        prev = np.clip(share[1] / (share[0] + share[1]), 0.03, 0.97)
        sites = [{"name": f"site{i}", "n_train": 250, "n_val": 50, "n_test": 150, "prevalence": float(p),
                  "scanner": SCANNERS[0]} for i, p in enumerate(prev)]
        return {"source": "synthetic", "image_size": 28, "sites": sites}
    return {"source": "medmnist", "path": str(BREAST),
            "partition": {"method": "dirichlet", "alpha": 0.5, "sites": ["site0", "site1", "site2"]}}


def job_for(setting: str, seed: int, algorithm: dict, compare: list[str], rounds: int, out: Path):
    return parse_job({
        "name": f"{setting}-{algorithm['name']}-{seed}", "seed": seed, "output": str(out), "rounds": rounds,
        "threads": 2, "device": "cpu", "data": data_for(setting, seed),
        "model": {"name": "small_cnn", "width": 16}, "task": {"labels": "binary", "monitor": "auc"},
        "algorithm": algorithm,
        # SCAFFOLD needs plain SGD (see ScaffoldConfig); everything else uses momentum 0.9
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.02,
                  "momentum": 0.0 if algorithm["name"] == "scaffold" else 0.9},
        "compare": compare,
    })


def read(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def summarize(recs: list[dict], arm: str, rounds: int) -> dict:
    test = [r for r in recs if r["arm"] == arm and r["split"] == "test"]
    last = {(r["site"], r["metric"]): r["value"] for r in test if r["round"] == rounds}
    sites = sorted({s for s, _ in last if s != "all"})
    auc = [last[(s, "auc")] for s in sites if last.get((s, "auc")) is not None]
    acc = [last[(s, "accuracy")] for s in sites]
    reach = next((r["round"] for r in sorted(test, key=lambda r: r["round"])
                  if r["site"] == "all" and r["metric"] == "auc" and r["value"] is not None and r["value"] >= TARGET), None)
    return {"auc": sum(auc) / len(auc) if auc else None, "worst_auc": min(auc) if auc else None,
            "acc": sum(acc) / len(acc), "reach": reach}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settings", default="feature-shift,label-skew,breastmnist")
    ap.add_argument("--methods", default="", help="comma-separated method names (e.g. fedper); default: all")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    set_threads(2)
    results: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            if setting == "breastmnist" and not BREAST.is_file():
                print(f"skipping breastmnist: {BREAST} not found")
                continue
            for seed in seeds:
                for i, (label, algo) in enumerate(METHODS.items()):
                    if args.methods and algo["name"] not in args.methods.split(","):
                        continue
                    out = Path(tmp) / f"{setting}-{seed}-{i}"
                    compare = ["local", "centralized"] if algo["name"] == "fedavg" else []
                    run_job(job_for(setting, seed, algo, compare, args.rounds, out))
                    recs = read(out)
                    results.setdefault((setting, label), []).append(summarize(recs, "federated", args.rounds))
                    for arm in compare:
                        results.setdefault((setting, arm), []).append(summarize(recs, arm, args.rounds))
                    if any(r["arm"] == "personalized" for r in recs):
                        results.setdefault((setting, f"{label}: personal models"), []).append(
                            summarize(recs, "personalized", args.rounds))
                    print(f"  {setting} seed {seed} {label}: {results[(setting, label)][-1]} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def ms(vals: list) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    print(f"\n| setting | method | test AUC, site mean | worst site AUC | test accuracy, site mean | "
          f"round mean AUC >= {TARGET} (per seed) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (setting, label), rows in results.items():
        reach = ", ".join("–" if r["reach"] is None else str(r["reach"]) for r in rows)
        print(f"| {setting} | {label} | {ms([r['auc'] for r in rows])} | {ms([r['worst_auc'] for r in rows])} | "
              f"{ms([r['acc'] for r in rows])} | {reach} |")
    print(f"\n{len(seeds)} seeds, {args.rounds} rounds; mean ± standard deviation over seeds; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
