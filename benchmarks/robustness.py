"""Robust aggregation rules against FedAvg when a share of the sites attacks.

Usage: python benchmarks/robustness.py [--quick] [--data synthetic,breastmnist]
       [--attacks sign_flip,scale] [--out FOLDER]

For every data set, FedAvg (no ``robust`` section) and each robust rule train the small
CNN with 0 %, 10 %, 20 % and 30 % of the 10 training sites attacking (the attackers are
drawn with the job seed, the same sites for every rule):
  sign_flip  each attacker sends -4 times its honest change to the global model
  scale      model replacement: each attacker sends 10 times its honest change
Rules: median, trimmed_mean (trim 0.3), krum (f 3), multi_krum (f 3, select 4) and
norm_bound, whose max_norm is the median L2 norm of the honest sites' changes in the
clean FedAvg run of the same data (every site's update replayed at the first, middle and
last round from that run's global models; the run's own seeds make the replay exact).

Data (seed 0; SGD lr 0.02, momentum 0.9, batch 32; 1 thread):
  synthetic    10 sites of 100 training, 20 val and 50 test images (28x28, prevalence
               0.4, one scanner), 12 rounds of 1 local epoch.
  breastmnist  BreastMNIST split IID into 10 sites (about 55 training and 16 test images
               each), 15 rounds of 3 local epochs; skipped when the file is absent.
The attack-free column (0 %) is one set of runs, shown in both attack tables. Each cell
is the final federated model's test AUC / accuracy, averaged over the sites' own test
sets (sites whose AUC is undefined are left out of the AUC mean); † marks a final model
that outputs NaN on test images (checked by running it on every site's test set).
``--quick``: 3 rounds, smaller sites, 0 % and 30 % only (a smoke test, not results).
``--out FOLDER`` keeps the run folders and writes results.json there (default: a
temporary folder, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from final_model import data_section, data_sets, final_test_means, nan_outputs, small_cnn_job
from medfed.core.params import delta, l2_norm
from medfed.core.types import Arm
from medfed.data.sites import build_sites
from medfed.models import get_params
from medfed.server.loop import make_plan
from medfed.server.runner import initial_model, run_job
from medfed.site.app import build_site_apps
from medfed.site.device import set_threads
from medfed.tracking.metrics import read_metrics

N_SITES = 10
SEED = 0
THREADS = 1

ATTACK_SCALE = {"sign_flip": 4.0, "scale": 10.0}
FRACTIONS = [0.0, 0.1, 0.2, 0.3]
QUICK_FRACTIONS = [0.0, 0.3]

# rule label -> the job's robust section (None: plain FedAvg); norm_bound's max_norm is
# filled in per data set from the clean run
RULES: dict[str, dict | None] = {
    "fedavg": None,
    "median": {"rule": "median"},
    "trimmed_mean (trim 0.3)": {"rule": "trimmed_mean", "trim": 0.3},
    "krum (f 3)": {"rule": "krum", "f": 3},
    "multi_krum (f 3, select 4)": {"rule": "multi_krum", "f": 3, "select": 4},
    "norm_bound": {"rule": "norm_bound"},
}


def data_settings(name: str, quick: bool) -> tuple[dict, int, int]:
    """The job's ``data`` section, the number of rounds and of local epochs."""
    data = data_section(name, N_SITES, 40 if quick else 100, 50)
    if name == "synthetic":
        return data, 3 if quick else 12, 1
    return data, 3 if quick else 15, 1 if quick else 3


def make_job(name: str, data: dict, rounds: int, epochs: int, out: Path,
             robust: dict | None = None, attack: dict | None = None):
    return small_cnn_job(name, data, rounds, epochs, out, SEED, THREADS, robust=robust, attack=attack)


def summarize(run_dir: Path) -> dict:
    """Mean over the sites of the final federated model's test AUC and accuracy."""
    recs = read_metrics(run_dir / "metrics.jsonl")
    clipped = [r["value"] for r in recs if r["metric"] == "clipped_fraction" and r["value"] is not None]
    return {**final_test_means(recs), "clipped_fraction": statistics.mean(clipped) if clipped else None}


def honest_norms(job, globals_before: dict[int, dict], globals_after: dict[int, dict]) -> tuple[list[float], float]:
    """L2 norms of every site's change to the global model, replayed at the rounds of
    ``globals_before`` (round -> the global params that round started from); and, as a
    check that the replay is the run's, the largest difference between the example-weighted
    mean of the replayed changes and the run's own step at the rounds of ``globals_after``."""
    sites = build_sites(job)
    sizes = {s.name: len(s.train.labels) for s in sites}
    apps = build_site_apps(job, sites, torch.device("cpu"))
    job_id = job.job_id
    norms, worst = [], 0.0
    for rnd, params in sorted(globals_before.items()):
        total = sum(sizes[s] for s in job.training_sites)
        mean: dict[str, torch.Tensor] = {}
        for i, name in enumerate(job.training_sites):
            update = apps[name].fit(params, make_plan(job, job_id, Arm.FEDERATED, rnd, i))
            d = delta(update.params, params)
            norms.append(l2_norm(d))
            for k, t in d.items():
                mean[k] = mean.get(k, 0) + t.double() * (sizes[name] / total)
        if rnd in globals_after:
            step = delta(globals_after[rnd], params)
            worst = max(worst, max(float((mean[k] - step[k].double()).abs().max()) for k in mean))
    return norms, worst


def fmt(cell: dict | None) -> str:
    if cell is None:
        return "not run"
    if "error" in cell:
        return "error"
    auc = "–" if cell["auc"] is None else f"{cell['auc']:.3f}"
    acc = "–" if cell["acc"] is None else f"{cell['acc']:.3f}"
    return f"{auc} / {acc}" + (" †" if cell.get("nan_outputs") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, small sites, 0%% and 30%% attackers only")
    ap.add_argument("--data", default="synthetic,breastmnist")
    ap.add_argument("--attacks", default="sign_flip,scale")
    ap.add_argument("--out", default="", help="folder for the run folders and results.json (default: temporary)")
    args = ap.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    for a in attacks:
        if a not in ATTACK_SCALE:
            ap.error(f"--attacks: unknown attack {a!r}; choose from {sorted(ATTACK_SCALE)}")
    fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
    set_threads(THREADS)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for dname in data_sets(args.data, ap.error):
            data, rounds, epochs = data_settings(dname, args.quick)
            cells: dict[str, dict] = {}  # "attack|fraction|rule" -> summary
            site_data: list = []  # the sites' data, built once per data set for the NaN check
            info: dict = {"rounds": rounds, "local_epochs": epochs}
            results[dname] = {"settings": info, "cells": cells}

            def run(rule: str, robust: dict | None, attack: str | None, frac: float, on_round=None) -> dict:
                key = f"{attack or 'none'}|{frac}|{rule}"
                att = None if attack is None or frac == 0 else {
                    "kind": attack, "fraction": frac, "scale": ATTACK_SCALE[attack]}
                slug = f"{dname}-{attack or 'clean'}-{int(round(frac * 100))}-{rule.split()[0]}"
                t = time.perf_counter()
                try:
                    job = make_job(slug, data, rounds, epochs, base / slug, robust, att)
                    run_job(job, overwrite=True, on_round=on_round)
                    cell = summarize(base / slug)
                    if not site_data:
                        site_data.extend(build_sites(job))
                    cell["nan_outputs"], cell["test_images"], cell["negative_running_var"] = nan_outputs(
                        job, base / slug, site_data)
                except Exception as e:  # a medfed failure in one setting: note it, go on
                    cell = {"error": f"{type(e).__name__}: {e}", "robust": robust, "attack": att}
                    print(f"  ERROR in {slug} (robust {robust}, attack {att}):", flush=True)
                    traceback.print_exc()
                cell["seconds"] = round(time.perf_counter() - t, 1)
                cells[key] = cell
                extra = "" if cell.get("clipped_fraction") is None else f", clipped {cell['clipped_fraction']:.2f}"
                if cell.get("nan_outputs"):
                    extra += (f"; NaN output for {cell['nan_outputs']} of {cell['test_images']} test images, "
                              f"{cell['negative_running_var']} negative BN running variances")
                print(f"  {dname} {attack or 'no attack'} {frac:.0%} {rule}: {fmt(cell)}{extra} "
                      f"({cell['seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s)", flush=True)
                return cell

            # clean FedAvg first: its global models give the honest update norms for norm_bound
            globals_at: dict[int, dict] = {}  # round -> the global model after it
            calib_rounds = sorted({1, (rounds + 1) // 2, rounds})

            def keep(summary, params) -> None:
                if summary.arm is Arm.FEDERATED and (summary.round + 1 in calib_rounds or summary.round in calib_rounds):
                    globals_at[summary.round] = {k: v.detach().clone() for k, v in params.items()}

            clean = run("fedavg", None, None, 0.0, on_round=keep)
            if "error" in clean:
                print(f"  {dname}: the clean FedAvg run failed; skipping the data set", flush=True)
                continue
            t = time.perf_counter()
            job = make_job(f"{dname}-clean-0-fedavg", data, rounds, epochs, base / f"{dname}-clean-0-fedavg")
            globals_at[0] = get_params(initial_model(job, 1))
            norms, worst = honest_norms(job, {r: globals_at[r - 1] for r in calib_rounds},
                                        {r: globals_at[r] for r in calib_rounds})
            max_norm = float(f"{statistics.median(norms):.3g}")
            info.update({"max_norm": max_norm, "honest_norm_min": min(norms), "honest_norm_median": statistics.median(norms),
                         "honest_norm_max": max(norms), "calibration_rounds": calib_rounds, "replay_max_diff": worst})
            print(f"  {dname}: honest update norms at rounds {calib_rounds}: min {min(norms):.3g}, "
                  f"median {statistics.median(norms):.3g}, max {max(norms):.3g}; norm_bound max_norm {max_norm:g}; "
                  f"replay vs run step, largest difference {worst:.2g} "
                  f"({time.perf_counter() - t:.0f} s, total {time.perf_counter() - t0:.0f} s)", flush=True)
            rules = {k: (dict(v, max_norm=max_norm) if v is not None and v["rule"] == "norm_bound" else v)
                     for k, v in RULES.items()}
            for rule, robust in rules.items():
                if rule != "fedavg":
                    run(rule, robust, None, 0.0)
            for attack in attacks:
                for frac in fractions[1:]:
                    for rule, robust in rules.items():
                        run(rule, robust, attack, frac)
            results[dname]["rules"] = rules
        if args.out:
            (base / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    for dname, res in results.items():
        info, cells = res["settings"], res["cells"]
        if "rules" not in res:  # the clean run failed: nothing to compare with
            continue
        for attack in attacks:
            print(f"\n### {dname}, {attack} (scale {ATTACK_SCALE[attack]:g}): test AUC / accuracy, site mean, "
                  f"round {info['rounds']}\n")
            print("| rule | " + " | ".join(f"{f:.0%} attackers" for f in fractions) + " |")
            print("| --- |" + " --- |" * len(fractions))
            for rule, robust in res["rules"].items():
                label = rule if rule != "norm_bound" else f"norm_bound (max_norm {robust['max_norm']:g})"
                row = [fmt(cells.get(f"none|0.0|{rule}") if f == 0 else cells.get(f"{attack}|{f}|{rule}"))
                       for f in fractions]
                print(f"| {label} | " + " | ".join(row) + " |")
            if any(c.get("nan_outputs") for k, c in cells.items() if k.startswith(("none|", f"{attack}|"))):
                print("\n† the final model outputs NaN for some or all test images (negative batch-norm running "
                      "variance); medfed leaves its metrics undefined (–)")
        errors = {k: c["error"] for k, c in cells.items() if "error" in c}
        for k, e in errors.items():
            print(f"\nerror in {dname} {k}: {e}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
