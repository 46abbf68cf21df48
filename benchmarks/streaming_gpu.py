"""Streamed data on a CUDA device: the same job trained with ``data.cache: memory``, ``none``
and ``disk`` (2 loader workers, pinned memory, mixed precision) must give the same metrics
and model as memory does, on a 2D classification job (folder of PNGs) and a 3D
segmentation job (NIfTI volumes, patches, sliding-window evaluation). Two memory runs are
compared first: CUDA kernels need not be bitwise repeatable, and when they are not, the
streamed runs are compared with that spread.

    python benchmarks/streaming_gpu.py --root /tmp/streamgpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def folder_data(root: Path) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    sites = []
    for name in ("a", "b"):
        d = root / "folder" / name
        d.mkdir(parents=True, exist_ok=True)
        rows = ["file,label"]
        for i in range(80):
            label = i % 2
            Image.fromarray((rng.random((32, 32)) * 120 + label * 100).astype(np.uint8)).save(d / f"{i}.png")
            rows.append(f"{i}.png,{label}")
        (d / "labels.csv").write_text("\n".join(rows) + "\n")
        sites.append({"name": name, "images": str(d), "csv": str(d / "labels.csv")})
    return sites


def volume_data(root: Path) -> list[dict]:
    import nibabel as nib

    rng = np.random.default_rng(1)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, 48, dtype=np.float32),) * 3, indexing="ij")
    sites = []
    for name in ("a", "b"):
        img, msk = root / "vol" / name / "images", root / "vol" / name / "masks"
        img.mkdir(parents=True, exist_ok=True)
        msk.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            c = rng.uniform(-0.3, 0.3, 3)
            organ = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 0.15
            image = organ * 1.0 + rng.normal(0, 0.3, organ.shape)
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(img / f"c{i}.nii.gz"))
            nib.save(nib.Nifti1Image(organ.astype(np.uint8), np.eye(4)), str(msk / f"c{i}.nii.gz"))
        sites.append({"name": name, "images": str(img), "masks": str(msk)})
    return sites


def job(root: Path, kind: str, sites: list[dict], cache: str, workers: int, out: str):
    from medfed.config import parse_job

    data = {"cache": cache, "loader": {"workers": workers}, "cache_dir": str(root / "cache"), "sites": sites}
    if kind == "2d":
        body = {"model": {"name": "small_cnn"}, "task": {"labels": "binary"},
                "transforms": {"augment": [{"name": "flip"}]},
                "data": {"source": "folder", "label_columns": ["label"], **data}}
    else:
        body = {"model": {"name": "unet", "width": 8}, "task": {"kind": "segmentation", "num_classes": 2},
                "transforms": {"patch": [32, 32, 32], "augment": [{"name": "flip"}]},
                "data": {"source": "volumes", **data}}
    return parse_job({"name": kind, "output": str(root / out), "rounds": 2, "seed": 3, "device": "cuda",
                      "train": {"local_epochs": 1, "batch_size": 4}, "compare": ["local", "centralized"], **body})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/streamgpu"))
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from medfed.server.runner import run_job

    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| job | cache | workers | seconds | metrics equal to memory run 1 | largest metric difference | "
          "model equal | max abs weight diff |")
    print("|---|---|---:|---:|---|---|---|---:|")
    for kind, make in (("2d", folder_data), ("3d", volume_data)):
        sites = make(args.root)
        runs = [("memory", 0), ("memory", 0), ("none", 0), ("none", 2), ("disk", 2), ("disk", 2)]
        base = None
        for k, (cache, workers) in enumerate(runs):
            t = time.perf_counter()
            run = run_job(job(args.root, kind, sites, cache, workers, f"run-{kind}-{k}"), overwrite=True).run_dir
            seconds = time.perf_counter() - t
            metrics = sorted((run / "metrics.jsonl").read_text().splitlines())
            model = load_file(str(run / "model_final.safetensors"))
            if base is None:
                base = (metrics, model)
            same_m = metrics == base[0]
            gap = _largest_gap(metrics, base[0])
            same_w = all(torch.equal(model[n], base[1][n]) for n in model)
            diff = max(float((model[n].float() - base[1][n].float()).abs().max()) for n in model)
            print(f"| {kind} | {cache} | {workers} | {seconds:.1f} | {same_m} | {gap} | {same_w} | {diff:.3g} |",
                  flush=True)


def _largest_gap(lines: list[str], base: list[str]) -> str:
    """The metric that differs most between two runs' metrics.jsonl, as 'name: difference'."""
    import json

    def table(rows):
        out = {}
        for row in map(json.loads, rows):
            out[(row["round"], row["arm"], row["site"], row["split"], row["metric"])] = row["value"]
        return out

    a, b = table(lines), table(base)
    gaps = [(abs(a[k] - b[k]), k[4]) for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None and a[k] != b[k]]
    if not gaps:
        return "none"
    size, name = max(gaps)
    return f"{name}: {size:.3g}"


if __name__ == "__main__":
    main()
