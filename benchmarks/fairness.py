"""Fairness between sites: FedAvg, FedBN, q-FedAvg, FedCE and HarmoFL under feature shift
and on BreastMNIST split into sites, side by side.

Usage: python benchmarks/fairness.py [--seeds 0,1,2] [--rounds 20] [--settings feature-shift,breastmnist]
       [--methods fedavg,fedbn,qfedavg,fedce,harmofl]

The settings, model and training budget are those of benchmarks/algorithms.py (4 synthetic
sites with strongly different scanners; BreastMNIST in 3 sites, Dirichlet 0.5; small CNN,
``rounds`` rounds of 1 local epoch, SGD lr 0.02, momentum 0.9). For each setting, method
and seed it takes the federated model's test AUC at every site at the last round and
reports the site mean, the worst and best site, the standard deviation across sites and
the gap (best - worst), each as mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from algorithms import BREAST, job_for, read  # noqa: E402  (the same settings and jobs)

from medfed.server.runner import run_job  # noqa: E402
from medfed.site.device import set_threads  # noqa: E402

METHODS = {
    "fedavg": {"name": "fedavg"},
    "fedbn": {"name": "fedbn"},
    "qfedavg (q 1)": {"name": "qfedavg", "q": 1.0},
    "fedce (times)": {"name": "fedce"},
    "harmofl (alpha 0.05)": {"name": "harmofl", "alpha": 0.05},
}


def site_aucs(recs: list[dict], rounds: int) -> list[float]:
    return [r["value"] for r in recs if r["arm"] == "federated" and r["split"] == "test" and r["metric"] == "auc"
            and r["round"] == rounds and r["site"] not in ("all", "median") and r["value"] is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settings", default="feature-shift,breastmnist")
    ap.add_argument("--methods", default="fedavg,fedbn,qfedavg,fedce,harmofl",
                    help="which of the methods to run, by algorithm name")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = set(args.methods.split(","))
    methods = {label: algo for label, algo in METHODS.items() if algo["name"] in wanted}
    set_threads(2)
    rows: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            if setting == "breastmnist" and not BREAST.is_file():
                print(f"skipping breastmnist: {BREAST} not found")
                continue
            for seed in seeds:
                for i, (label, algo) in enumerate(methods.items()):
                    out = Path(tmp) / f"{setting}-{seed}-{i}"
                    run_job(job_for(setting, seed, algo, [], args.rounds, out))
                    aucs = site_aucs(read(out), args.rounds)
                    row = {"mean": statistics.mean(aucs), "worst": min(aucs), "best": max(aucs),
                           "std": statistics.pstdev(aucs), "gap": max(aucs) - min(aucs)}
                    rows.setdefault((setting, label), []).append(row)
                    print(f"  {setting} seed {seed} {label}: {row} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def ms(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    print("\n| setting | method | test AUC, site mean | worst site | best site | std across sites | gap |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (setting, label), found in rows.items():
        print(f"| {setting} | {label} | " + " | ".join(ms([r[k] for r in found]) for k in
                                                      ("mean", "worst", "best", "std", "gap")) + " |")
    print(f"\n{len(seeds)} seeds, {args.rounds} rounds; mean ± standard deviation over seeds; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
