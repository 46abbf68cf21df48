"""Fine-tuning from pretrained weights against training from scratch, BreastMNIST at 3 sites.

Usage: python benchmarks/finetune.py [--seeds 0,1,2] [--rounds 20] [--pretrain-epochs 10] [--width 16]
       [--keep DIR]

1. Pretraining, centrally: one medfed run with a single site holding the whole training
   split of PneumoniaMNIST (``../shared/data/medmnist/pneumoniamnist.npz``, official split,
   28x28 chest X-rays, normal against pneumonia); when that file is absent, a message says
   so and a synthetic task stands in (one site of 3,000 generated 28x28 images, lesion
   present or not, medfed's ``synthetic`` source). ``--pretrain-epochs`` epochs (rounds of
   one local epoch at the one site), seed 0. Its final weights are saved as
   ``pretrained.safetensors`` (medfed's ``model_final.safetensors``), and again without the
   ``head.`` entries as ``pretrained_body.safetensors``.
2. For each seed, BreastMNIST (``../shared/data/medmnist/breastmnist.npz``, official split)
   divided IID among 3 sites, FedAvg, ``--rounds`` rounds of 1 local epoch, three jobs that
   differ only in ``model.init``:
     scratch           no init: medfed's seeded initialisation
     pretrained        ``init: pretrained.safetensors`` (``init_keys: strict``: both tasks are
                       binary, so every entry, the one-logit head included, matches)
     pretrained body   ``init: pretrained_body.safetensors``, ``init_keys: partial``: the
                       pretrained features with the head as the seed builds it
   Same network (small_cnn), same optimizer (SGD lr 0.01, momentum 0.9, batch 32) in every
   arm. Each run is ``medfed.run`` on a job dict, as ``medfed run`` would run it.

Metric: the federated model's test AUC at site ``all`` (the example-weighted mean of the 3
sites' test AUC, from each run's metrics.jsonl) after every round. Printed: a Markdown table
of the mean over seeds by round, then the last round's mean ± standard deviation over seeds
and each seed's value. Skipped with a message when BreastMNIST is absent.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import medfed

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST = ROOT.parent / "shared" / "data" / "medmnist"
BREAST = MEDMNIST / "breastmnist.npz"
PNEUMONIA = MEDMNIST / "pneumoniamnist.npz"
ARMS = ("scratch", "pretrained", "pretrained body")
TRAIN = {"local_epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9}


def pretrain_data() -> tuple[dict, str]:
    if PNEUMONIA.is_file():
        return ({"source": "medmnist", "path": str(PNEUMONIA), "partition": {"method": "iid", "sites": ["central"]}},
                "PneumoniaMNIST train split (official split, one site)")
    print(f"PneumoniaMNIST is absent ({PNEUMONIA}): pretraining on a synthetic task instead "
          "(3,000 generated 28x28 images, lesion present or not)", flush=True)
    site = {"name": "central", "n_train": 3000, "n_val": 200, "n_test": 500, "prevalence": 0.5}
    return ({"source": "synthetic", "image_size": 28, "lesion_contrast": 0.3, "sites": [site]},
            "synthetic task (medfed's synthetic source, one site of 3,000 28x28 images, lesion present or not)")


def pretrain(out: Path, epochs: int, width: int) -> tuple[Path, Path, str, float | None]:
    """Train centrally (one site) and save the weights: with and without the head."""
    from safetensors.torch import load_file, save_file

    data, what = pretrain_data()
    job = {"name": "pretrain", "seed": 0, "output": str(out / "pretrain"), "rounds": epochs, "threads": 2,
           "device": "cpu", "data": data, "model": {"name": "small_cnn", "width": width},
           "task": {"labels": "binary", "monitor": "auc"}, "train": TRAIN}
    result = medfed.run(job, progress=False)
    test_auc = last(result.metrics, "central")
    weights = load_file(str(result.run_dir / "model_final.safetensors"))
    full, body = out / "pretrained.safetensors", out / "pretrained_body.safetensors"
    save_file(weights, str(full))
    save_file({k: v for k, v in weights.items() if not k.startswith("head.")}, str(body))
    return full, body, what, test_auc


def last(records: list[dict], site: str) -> float | None:
    rows = {r["round"]: r["value"] for r in records
            if r["arm"] == "federated" and r["site"] == site and r["split"] == "test" and r["metric"] == "auc"}
    return rows[max(rows)] if rows else None


def federated_job(seed: int, rounds: int, width: int, out: Path, init: dict) -> dict:
    return {
        "name": "breastmnist-finetune", "seed": seed, "output": str(out), "rounds": rounds, "threads": 2,
        "device": "cpu",
        "data": {"source": "medmnist", "path": str(BREAST),
                 "partition": {"method": "iid", "sites": ["hospital_a", "hospital_b", "hospital_c"]}},
        "model": {"name": "small_cnn", "width": width, **init},
        "task": {"labels": "binary", "monitor": "auc"},
        "algorithm": {"name": "fedavg"},
        "train": TRAIN,
    }


def auc_by_round(records: list[dict]) -> dict[int, float | None]:
    return {r["round"]: r["value"] for r in records
            if r["arm"] == "federated" and r["site"] == "all" and r["split"] == "test" and r["metric"] == "auc"}


def mean_sd(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}" + ("" if len(vals) == len(values) else f" (n={len(vals)})")


def mean(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return f"{statistics.mean(vals):.3f}" if vals else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=16, help="small_cnn width, every arm and the pretraining")
    ap.add_argument("--keep", type=Path, help="write the run folders here instead of a temporary folder")
    args = ap.parse_args()
    if not BREAST.is_file():
        print(f"skipped: {BREAST} is absent (see ../shared/data/README.md)")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        full, body, what, pre_auc = pretrain(out, args.pretrain_epochs, args.width)
        t_pre = time.perf_counter() - t0
        pre = "–" if pre_auc is None else f"{pre_auc:.3f}"
        print(f"pretrained on {what}: {args.pretrain_epochs} epochs, test AUC {pre} on its own task, "
              f"{t_pre:.0f} s", flush=True)
        inits = {"scratch": {},
                 "pretrained": {"init": str(full), "init_keys": "strict"},
                 "pretrained body": {"init": str(body), "init_keys": "partial"}}
        curves: dict[str, list[dict[int, float | None]]] = {arm: [] for arm in ARMS}
        for seed in seeds:
            for i, arm in enumerate(ARMS):
                job = federated_job(seed, args.rounds, args.width, out / f"seed{seed}-{i}", inits[arm])
                result = medfed.run(job, progress=False)
                curves[arm].append(auc_by_round(result.metrics))
                print(f"seed {seed} {arm}: final test AUC {mean([curves[arm][-1].get(args.rounds)])} "
                      f"({result.elapsed_s:.1f} s)", flush=True)
    total = time.perf_counter() - t0
    print(f"\nseeds {seeds}, {args.rounds} rounds of 1 local epoch, small_cnn width {args.width}; "
          f"pretraining {t_pre:.0f} s, {total:.0f} s in all\n")
    print("Federated test AUC (site `all`), mean over seeds, by round:\n")
    print("| round | " + " | ".join(ARMS) + " | pretrained - scratch |")
    print("| ---: | " + " | ".join("---:" for _ in ARMS) + " | ---: |")
    for rnd in range(1, args.rounds + 1):
        cells = {arm: [c.get(rnd) for c in curves[arm]] for arm in ARMS}
        diff = [p - s for p, s in zip(cells["pretrained"], cells["scratch"]) if p is not None and s is not None]
        gap = f"{statistics.mean(diff):+.3f}" if diff else "–"
        print(f"| {rnd} | " + " | ".join(mean(cells[arm]) for arm in ARMS) + f" | {gap} |")
    print(f"\nTest AUC at round {args.rounds}, mean ± standard deviation over seeds (each seed):\n")
    print("| arm | final test AUC | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in seeds) + " |")
    for arm in ARMS:
        finals = [c.get(args.rounds) for c in curves[arm]]
        print(f"| {arm} | {mean_sd(finals)} | " + " | ".join(mean([v]) for v in finals) + " |")


if __name__ == "__main__":
    main()
