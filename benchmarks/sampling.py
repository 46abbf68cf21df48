"""Client selection: uniform sampling against sampling by loss (power of choice) and
adaptive sampling (after Active Federated Learning) at 10% and 30% participation, on 50 synthetic sites with
skewed labels.

Usage: python benchmarks/sampling.py [--seeds 0,1,2] [--rounds 30] [--sites 50]
       [--methods uniform,loss,adaptive]

Each site has 60 training, 20 validation and 40 test images (1x28x28, the synthetic lesion
task), one of four scanners, and a label prevalence drawn from Beta(0.3, 0.3) (clipped to
[0.05, 0.95]): sites differ in what they teach. FedAvg, small CNN (width 8), 1 local epoch
of SGD (lr 0.02, momentum 0.9) a round; the global model is evaluated every 5 rounds at
every site. ``loss`` draws twice the round's count of candidates uniformly and trains those
with the highest training loss in their last round (a site not yet seen first);
``adaptive`` (server/sampling.py, after Active Federated Learning) draws with chances that
grow with each site's last training loss times the square root of its examples, at its
default settings (exclude 0.75, sharpness 1, explore 0.1; sites not yet seen first). It prints,
per participation and method, the test AUC (site mean and worst site) at the last round
and the number of distinct sites that trained, mean ± standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from algorithms import SCANNERS, read, summarize  # noqa: E402  (the same scanners and summary)

from medfed.config import parse_job  # noqa: E402
from medfed.server.runner import run_job  # noqa: E402
from medfed.site.device import set_threads  # noqa: E402


def job_for(seed: int, sites: int, count: int, method: str, rounds: int, out: Path):
    rng = np.random.default_rng([seed, 4242])
    prevalence = np.clip(rng.beta(0.3, 0.3, size=sites), 0.05, 0.95)
    return parse_job({
        "name": f"sampling-{method}-{count}-{seed}", "seed": seed, "output": str(out), "rounds": rounds,
        "threads": 2, "device": "cpu", "eval_every": 5,
        "data": {"source": "synthetic", "image_size": 28, "sites": [
            {"name": f"site{i:02d}", "n_train": 60, "n_val": 20, "n_test": 40, "prevalence": float(p),
             "scanner": SCANNERS[i % len(SCANNERS)]} for i, p in enumerate(prevalence)]},
        "model": {"name": "small_cnn", "width": 8}, "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "momentum": 0.9},
        "sampling": {"count": count, "method": method},
    })


def distinct_trained(recs: list[dict]) -> int:
    return len({r["site"] for r in recs if r["arm"] == "federated" and r["split"] == "train"
                and r["metric"] == "loss" and r["site"] not in ("all", "median")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--methods", default="uniform,loss,adaptive")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    set_threads(2)
    results: dict[tuple[int, str], list[dict]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for share in (0.1, 0.3):
                count = max(1, round(share * args.sites))
                for method in args.methods.split(","):
                    out = Path(tmp) / f"{seed}-{count}-{method}"
                    run_job(job_for(seed, args.sites, count, method, args.rounds, out))
                    recs = read(out)
                    row = summarize(recs, "federated", args.rounds)
                    row["distinct"] = distinct_trained(recs)
                    results.setdefault((count, method), []).append(row)
                    print(f"  seed {seed} {count} sites/round {method}: {row} ({time.perf_counter() - t0:.0f} s)",
                          flush=True)

    def ms(vals: list, digits: int = 3) -> str:
        vals = [v for v in vals if v is not None]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}" if vals else "–"

    print(f"\n| sites per round (of {args.sites}) | method | test AUC, site mean | worst site AUC | "
          "distinct sites trained |")
    print("| --- | --- | --- | --- | --- |")
    for (count, method), rows in results.items():
        print(f"| {count} | {method} | {ms([r['auc'] for r in rows])} | {ms([r['worst_auc'] for r in rows])} | "
              f"{ms([r['distinct'] for r in rows], 1)} |")
    print(f"\n{len(seeds)} seeds, {args.rounds} rounds; mean ± standard deviation over seeds; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
