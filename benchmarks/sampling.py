"""Client selection: uniform sampling against sampling by loss (power of choice),
adaptive sampling (after Active Federated Learning) and unbiased sampling at 10% and 30% participation, on 50
synthetic sites with skewed labels.

Usage: python benchmarks/sampling.py [--seeds 0,1,2] [--rounds 30] [--sites 50]
       [--methods uniform,loss,adaptive,unbiased] [--dropout] [--uneven]

Each site has 60 training, 20 validation and 40 test images (1x28x28, the synthetic lesion
task), one of four scanners, and a label prevalence drawn from Beta(0.3, 0.3) (clipped to
[0.05, 0.95]): sites differ in what they teach. FedAvg, small CNN (width 8), 1 local epoch
of SGD (lr 0.02, momentum 0.9) a round; the global model is evaluated every 5 rounds at
every site. ``loss`` draws twice the round's count of candidates uniformly and trains those
with the highest training loss in their last round (a site not yet seen first);
``adaptive`` (server/sampling.py, after Active Federated Learning) draws with chances that
grow with each site's last training loss times the square root of its examples, at its
default settings (exclude 0.75, sharpness 1, explore 0.1; sites not yet seen first);
``unbiased`` (server/unbiased.py) draws the round's count of slots with replacement, with
chances proportional to examples over observed answer rate, and combines per local step.
It prints, per participation and method, the test AUC (site mean and worst site) at the last
round and the number of distinct sites that trained, mean ± standard deviation over seeds.

``--dropout``: a seeded third of the sites (drawn from the seed) fail to answer a round they
are drawn for with probability 0.6 (drawn from the seed, the round and the site; the site's
training raises, as a lost link would), and every job takes ``min_sites: 1``. The table then
adds the unreliable sites' share of the aggregate (their share of the round's weights: the
examples of the answering sites for the others, the multiplicities for ``unbiased``), mean
over rounds, against their share of the examples (the target). ``--uneven``: medfed has one
``local_epochs`` for all sites, so the sites' training sets differ instead: 30, 60 or 90
images (1, 2 or 3 steps of batch 32 a round) by site index.
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
from medfed.core.errors import RoundError  # noqa: E402
from medfed.server.runner import run_job  # noqa: E402
from medfed.site.app import SiteApp  # noqa: E402
from medfed.site.device import set_threads  # noqa: E402


DROP_CHANCE = 0.6  # --dropout: how often an unreliable site fails a round it is drawn for


def n_train(i: int, uneven: bool) -> int:
    return (30, 60, 90)[i % 3] if uneven else 60


def job_for(seed: int, sites: int, count: int, method: str, rounds: int, out: Path, dropout: bool = False,
            uneven: bool = False):
    rng = np.random.default_rng([seed, 4242])
    prevalence = np.clip(rng.beta(0.3, 0.3, size=sites), 0.05, 0.95)
    return parse_job({
        "name": f"sampling-{method}-{count}-{seed}", "seed": seed, "output": str(out), "rounds": rounds,
        "threads": 2, "device": "cpu", "eval_every": 5, **({"min_sites": 1} if dropout else {}),
        "data": {"source": "synthetic", "image_size": 28, "sites": [
            {"name": f"site{i:02d}", "n_train": n_train(i, uneven), "n_val": 20, "n_test": 40, "prevalence": float(p),
             "scanner": SCANNERS[i % len(SCANNERS)]} for i, p in enumerate(prevalence)]},
        "model": {"name": "small_cnn", "width": 8}, "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "momentum": 0.9},
        "sampling": {"count": count, "method": method},
    })


def unreliable_sites(seed: int, sites: int) -> set[str]:
    """--dropout: the seeded third of the sites that often fail to answer."""
    picks = np.random.default_rng([seed, 5151]).choice(sites, size=sites // 3, replace=False)
    return {f"site{i:02d}" for i in picks}


def fails(seed: int, rnd: int, site: str) -> bool:
    """Whether an unreliable ``site`` fails federated round ``rnd`` (the same for every method)."""
    return bool(np.random.default_rng([seed, 5153, rnd, int(site[4:])]).random() < DROP_CHANCE)


def dropping(seed: int, unreliable: set[str]):
    """SiteApp._fit that raises, as a lost link would, when an unreliable site fails its round
    (the in-process transport turns it into a SiteFailure; the round goes on without it)."""
    fit = SiteApp._fit

    def _fit(self, params, plan):
        if plan.arm.value == "federated" and self.name in unreliable and fails(seed, plan.round, self.name):
            raise ConnectionError(f"{self.name} did not answer round {plan.round} (benchmark dropout)")
        return fit(self, params, plan)

    return _fit


def unreliable_share(recs: list[dict], unreliable: set[str], sizes: dict[str, int]) -> float | None:
    """The unreliable sites' mean share of the round's aggregate weights: multiplicities of
    the answering sites (``unbiased``), else their examples."""
    answered: dict[int, set[str]] = {}
    slots: dict[tuple[int, str], float] = {}
    for r in recs:
        if r["arm"] != "federated" or r["split"] != "train" or r["site"] in ("all", "median"):
            continue
        if r["metric"] == "loss":
            answered.setdefault(r["round"], set()).add(r["site"])
        elif r["metric"] == "multiplicity":
            slots[(r["round"], r["site"])] = r["value"]
    shares = []
    for rnd, got in answered.items():
        weight = {s: slots[(rnd, s)] if slots else sizes[s] for s in got}
        shares.append(sum(v for s, v in weight.items() if s in unreliable) / sum(weight.values()))
    return statistics.mean(shares) if shares else None


def distinct_trained(recs: list[dict]) -> int:
    return len({r["site"] for r in recs if r["arm"] == "federated" and r["split"] == "train"
                and r["metric"] == "loss" and r["site"] not in ("all", "median")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--methods", default="uniform,loss,adaptive")
    ap.add_argument("--dropout", action="store_true", help="a third of the sites fail a drawn round with chance 0.6")
    ap.add_argument("--uneven", action="store_true", help="30, 60 or 90 training images per site (1-3 steps)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    set_threads(2)
    results: dict[tuple[int, str], list[dict]] = {}
    stopped: dict[tuple[int, str], int] = {}  # runs stopped by a round nobody answered
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for share in (0.1, 0.3):
                count = max(1, round(share * args.sites))
                for method in args.methods.split(","):
                    out = Path(tmp) / f"{seed}-{count}-{method}"
                    unreliable = unreliable_sites(seed, args.sites) if args.dropout else set()
                    sizes = {f"site{i:02d}": n_train(i, args.uneven) for i in range(args.sites)}
                    original = SiteApp._fit
                    if args.dropout:
                        SiteApp._fit = dropping(seed, unreliable)  # type: ignore[method-assign]
                    try:
                        run_job(job_for(seed, args.sites, count, method, args.rounds, out, args.dropout, args.uneven))
                    except RoundError as e:  # --dropout: every site drawn for a round failed; the run stops there
                        print(f"  seed {seed} {count} sites/round {method}: STOPPED: {e}", flush=True)
                        stopped[(count, method)] = stopped.get((count, method), 0) + 1
                        continue
                    finally:
                        SiteApp._fit = original  # type: ignore[method-assign]
                    recs = read(out)
                    row = summarize(recs, "federated", args.rounds)
                    row["distinct"] = distinct_trained(recs)
                    if args.dropout:
                        row["unreliable_share"] = unreliable_share(recs, unreliable, sizes)
                        row["target_share"] = sum(sizes[s] for s in unreliable) / sum(sizes.values())
                    results.setdefault((count, method), []).append(row)
                    print(f"  seed {seed} {count} sites/round {method}: {row} ({time.perf_counter() - t0:.0f} s)",
                          flush=True)

    def ms(vals: list, digits: int = 3) -> str:
        vals = [v for v in vals if v is not None]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}" if vals else "–"

    extra = " unreliable sites' share of the aggregate (target) |" if args.dropout else ""
    print(f"\n| sites per round (of {args.sites}) | method | test AUC, site mean | worst site AUC | "
          f"distinct sites trained |{extra}")
    print("| --- | --- | --- | --- | --- |" + (" --- |" if args.dropout else ""))
    for (count, method), rows in results.items():
        share = (f" {ms([r['unreliable_share'] for r in rows])} ({statistics.mean(r['target_share'] for r in rows):.3f}) |"
                 if args.dropout else "")
        print(f"| {count} | {method} | {ms([r['auc'] for r in rows])} | {ms([r['worst_auc'] for r in rows])} | "
              f"{ms([r['distinct'] for r in rows], 1)} |{share}")
    for (count, method), n in stopped.items():
        print(f"{count} sites/round {method}: {n} run(s) stopped (a round in which no drawn site answered), "
              "left out of the table")
    setting = ", ".join(f for f, on in (("dropout", args.dropout), ("uneven", args.uneven)) if on) or "default"
    print(f"\n{len(seeds)} seeds, {args.rounds} rounds, setting {setting}; mean ± standard deviation over seeds; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
