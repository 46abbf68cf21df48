"""Compression of the sites' updates: bytes sent against the final model's accuracy.

Usage: python benchmarks/compression.py [--quick] [--data synthetic,breastmnist] [--out FOLDER]

FedAvg with each ``compression`` setting: none, fp16, int8, topk 0.1 and topk 0.01 (all
with error feedback, the default), and topk 0.01 without error feedback. For each it
reports the tensor bytes all sites sent over the run (the sum of the federated arm's
``bytes_sent`` records, as encoded), its ratio to no compression, and the final federated
model's test AUC / accuracy averaged over the sites' own test sets, with the change
against no compression. † marks a final model that outputs NaN on test images (checked
by running it on every site's test set).

Data (seed 0; small CNN width 16; SGD lr 0.02, momentum 0.9, batch 32; 1 thread):
  synthetic    4 sites of 200 training, 20 val and 100 test images (28x28, prevalence
               0.4, one scanner), 20 rounds of 1 local epoch.
  breastmnist  BreastMNIST split IID into 4 sites (about 136 training and 39 test images
               each), 20 rounds of 2 local epochs; skipped when the file is absent.
``--quick``: 3 rounds and smaller sites (a smoke test, not results). ``--out FOLDER``
keeps the run folders and writes results.json there (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path


from final_model import data_section, data_sets, final_test_means, nan_outputs, small_cnn_job
from medfed.data.sites import build_sites
from medfed.server.runner import run_job
from medfed.site.device import set_threads
from medfed.tracking.metrics import read_metrics

N_SITES = 4
SEED = 0
THREADS = 1

SETTINGS: dict[str, dict | None] = {
    "none": None,
    "fp16, error feedback": {"method": "fp16"},
    "int8, error feedback": {"method": "int8"},
    "topk 0.1, error feedback": {"method": "topk", "fraction": 0.1},
    "topk 0.01, error feedback": {"method": "topk", "fraction": 0.01},
    "topk 0.01, no error feedback": {"method": "topk", "fraction": 0.01, "error_feedback": False},
}


def data_settings(name: str, quick: bool) -> tuple[dict, int, int]:
    """The job's ``data`` section, the number of rounds and of local epochs."""
    data = data_section(name, N_SITES, 60 if quick else 200, 100)
    if name == "synthetic":
        return data, 3 if quick else 20, 1
    return data, 3 if quick else 20, 1 if quick else 2


def make_job(name: str, data: dict, rounds: int, epochs: int, out: Path, compression: dict | None):
    return small_cnn_job(name, data, rounds, epochs, out, SEED, THREADS, compression=compression)


def summarize(run_dir: Path) -> dict:
    recs = read_metrics(run_dir / "metrics.jsonl")
    fed = [r for r in recs if r["arm"] == "federated"]
    sent = [r["value"] for r in fed if r["metric"] == "bytes_sent" and r["site"] != "all"]
    model = [r["value"] for r in fed if r["metric"] == "model_bytes"]
    return {"bytes_sent": sum(sent), "updates": len(sent), "model_bytes": model[0] if model else None,
            **final_test_means(recs)}


def f3(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def diff(x: float | None, ref: float | None) -> str:
    return "–" if x is None or ref is None else f"{x - ref:+.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds and small sites")
    ap.add_argument("--data", default="synthetic,breastmnist")
    ap.add_argument("--out", default="", help="folder for the run folders and results.json (default: temporary)")
    args = ap.parse_args()
    set_threads(THREADS)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for dname in data_sets(args.data, ap.error):
            data, rounds, epochs = data_settings(dname, args.quick)
            cells: dict[str, dict] = {}
            site_data: list = []  # the sites' data, built once per data set for the NaN check
            results[dname] = {"settings": {"rounds": rounds, "local_epochs": epochs, "sites": N_SITES}, "cells": cells}
            for i, (label, comp) in enumerate(SETTINGS.items()):
                slug = f"{dname}-{i}"
                t = time.perf_counter()
                try:
                    job = make_job(slug, data, rounds, epochs, base / slug, comp)
                    run_job(job, overwrite=True)
                    cell = summarize(base / slug)
                    if not site_data:
                        site_data.extend(build_sites(job))
                    cell["nan_outputs"], cell["test_images"], cell["negative_running_var"] = nan_outputs(
                        job, base / slug, site_data)
                except Exception as e:  # a medfed failure in one setting: note it, go on
                    cell = {"error": f"{type(e).__name__}: {e}", "compression": comp}
                    print(f"  ERROR in {dname} {label} (compression {comp}):", flush=True)
                    traceback.print_exc()
                cell["seconds"] = round(time.perf_counter() - t, 1)
                cells[label] = cell
                what = "error" if "error" in cell else (
                    f"{cell['bytes_sent'] / 1e6:.3f} MB sent in {cell['updates']} updates, "
                    f"AUC {f3(cell['auc'])}, accuracy {f3(cell['acc'])}")
                if cell.get("nan_outputs"):
                    what += (f"; NaN output for {cell['nan_outputs']} of {cell['test_images']} test images, "
                             f"{cell['negative_running_var']} negative BN running variances")
                print(f"  {dname} {label}: {what} ({cell['seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s)",
                      flush=True)
        if args.out:
            (base / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    for dname, res in results.items():
        s, cells = res["settings"], res["cells"]
        ref = cells.get("none", {})
        model = next((c["model_bytes"] for c in cells.values() if c.get("model_bytes")), None)
        size = "" if model is None else f"; model {model / 1e3:.1f} kB (float32)"
        print(f"\n### {dname}: {s['sites']} sites, {s['rounds']} rounds of {s['local_epochs']} local epoch(s){size}\n")
        print("| compression | bytes sent, all sites (MB) | ratio to none | test AUC | change vs none | "
              "test accuracy | change vs none |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, c in cells.items():
            if "error" in c:
                print(f"| {label} | error | | | | | |")
                continue
            ratio = "–" if not ref.get("bytes_sent") else f"{c['bytes_sent'] / ref['bytes_sent']:.4f}"
            mark = " †" if c.get("nan_outputs") else ""
            print(f"| {label}{mark} | {c['bytes_sent'] / 1e6:.3f} | {ratio} | {f3(c['auc'])} | "
                  f"{diff(c['auc'], ref.get('auc'))} | {f3(c['acc'])} | {diff(c['acc'], ref.get('acc'))} |")
        if any(c.get("nan_outputs") for c in cells.values()):
            print("\n† the final model outputs NaN for some or all test images (negative batch-norm running "
                  "variance); medfed leaves its metrics undefined (–)")
        for label, c in cells.items():
            if "error" in c:
                print(f"\nerror in {dname} {label}: {c['error']}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
