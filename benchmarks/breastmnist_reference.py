"""BreastMNIST: medfed's arms next to the published centralized reference.

Usage: python benchmarks/breastmnist_reference.py [--seeds 0,1,2] [--rounds 20] [--models small_cnn,resnet18]
       [--pooled-only]

For each model and seed it runs two jobs on ../shared/data/medmnist/breastmnist.npz
(skipped with a message without it):

* ``3 sites``: the official split divided among 3 sites with Dirichlet label skew
  (alpha 0.5), FedAvg with local and centralized baselines, 20 rounds of 1 local epoch;
  metrics on each site's own test split and their example-weighted mean ("all");
* ``pooled``: one site holding the whole official split, trained for the same number of
  epochs; its test split is the whole official test set (156 images), the setting of
  the published MedMNIST v2 reference (ResNet-18 at 28 px: AUC 0.901, ACC 0.863; trained
  100 epochs with Adam, batch 128, lr 0.001 and a decay schedule, the model chosen on
  val). Reported at the last round and at the round of best val AUC.

It prints a Markdown table of test AUC and accuracy (mean ± standard deviation over
seeds) for RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from medfed.config import parse_job
from medfed.server.runner import run_job
from medfed.tracking.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
PUBLISHED = {"auc": 0.901, "accuracy": 0.863}  # MedMNIST v2, ResNet-18 (28), test set


def job(model: str, seed: int, rounds: int, sites: list[str], method: str, out: Path, compare: list[str]) -> dict:
    partition = {"method": method, "sites": sites, **({"alpha": 0.5} if method == "dirichlet" else {})}
    return {
        "name": f"breastmnist-{model}-{len(sites)}", "seed": seed, "output": str(out), "rounds": rounds, "threads": 2,
        "data": {"source": "medmnist", "path": str(BREAST), "partition": partition},
        "model": {"name": model, **({"width": 32} if model == "small_cnn" else {})},
        "task": {"labels": "binary", "monitor": "auc"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9},
        "compare": compare,
    }


def last_round(records: list[dict], arm: str, site: str) -> dict[str, float | None]:
    rows = [r for r in records if r["arm"] == arm and r["site"] == site and r["split"] == "test"]
    if not rows:
        return {}
    last = max(r["round"] for r in rows)
    return {r["metric"]: r["value"] for r in rows if r["round"] == last}


def at_best_val(records: list[dict], arm: str, site: str, monitor: str = "auc") -> dict[str, float | None]:
    """Test metrics at the round whose val ``monitor`` was highest (the first such round):
    model selection on val, as the published benchmark does."""
    val = {r["round"]: r["value"] for r in records
           if r["arm"] == arm and r["site"] == site and r["split"] == "val" and r["metric"] == monitor and r["value"] is not None}
    if not val:
        return {}
    best = max(sorted(val), key=lambda k: val[k])
    return {r["metric"]: r["value"] for r in records
            if r["arm"] == arm and r["site"] == site and r["split"] == "test" and r["round"] == best}


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}" + ("" if len(vals) == len(values) else f" (n={len(vals)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--models", default="small_cnn,resnet18")
    ap.add_argument("--pooled-only", action="store_true", help="run only the pooled (centralized) job")
    args = ap.parse_args()
    if not BREAST.is_file():
        print(f"skipped: {BREAST} is absent (see ../shared/data/README.md)")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[tuple[str, str], dict[str, list]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for seed in seeds:
                out = Path(tmp) / f"{model}-{seed}-3"
                if not args.pooled_only:
                    run_job(parse_job(job(model, seed, args.rounds, ["hospital_a", "hospital_b", "hospital_c"],
                                          "dirichlet", out, ["local", "centralized"])))
                rec = read_metrics(out / "metrics.jsonl") if not args.pooled_only else []
                for arm in ("local", "federated", "centralized") if not args.pooled_only else ():
                    m = last_round(rec, arm, "all")
                    cell = rows.setdefault((model, f"3 sites, {arm} (site mean)"), {"auc": [], "accuracy": []})
                    cell["auc"].append(m.get("auc"))
                    cell["accuracy"].append(m.get("accuracy"))
                out = Path(tmp) / f"{model}-{seed}-1"
                run_job(parse_job(job(model, seed, args.rounds, ["pooled"], "iid", out, [])))
                rec = read_metrics(out / "metrics.jsonl")
                for setting, m in (("pooled official split (centralized), last round", last_round(rec, "federated", "pooled")),
                                   ("pooled official split (centralized), best val AUC round",
                                    at_best_val(rec, "federated", "pooled"))):
                    cell = rows.setdefault((model, setting), {"auc": [], "accuracy": []})
                    cell["auc"].append(m.get("auc"))
                    cell["accuracy"].append(m.get("accuracy"))
                print(f"{model} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nseeds {seeds}, {args.rounds} rounds of 1 epoch, {time.perf_counter() - t0:.0f} s in all\n")
    print("| model | setting | test AUC | test ACC |\n| --- | --- | --- | --- |")
    for (model, setting), m in rows.items():
        print(f"| {model} | {setting} | {fmt(m['auc'])} | {fmt(m['accuracy'])} |")
    print(f"| ResNet-18 (28), published | centralized, MedMNIST v2 | {PUBLISHED['auc']:.3f} | {PUBLISHED['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
