"""Hospital-scale 3D data from a disk cache: NIfTI volumes with label volumes, resampled
and normalized once (``data.cache: disk``), trained on 96^3 patches, evaluated with a
sliding window. Reports each epoch's time, what preprocessing costs, and the peak memory
(PSS and RSS summed over the process and its loader workers, sampled every 0.1 s).

    python benchmarks/streaming3d.py gen --root /tmp/stream3d --n 100
    python benchmarks/streaming3d.py run --root /tmp/stream3d --n 100

``gen`` writes ``<root>/<n>/{images,masks}/case_XXX.nii.gz``: 256x256x128 int16 volumes
(spacing 1 x 1 x 1.5 mm) of a body with an organ, and its 0/1 mask (never inside the
repository). The job resamples to 1.5 mm isotropic (171x171x128), z-scores, trains a 3D
UNet (width 8) on 96^3 patches, batch 2, 2 loader workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import measure_child  # noqa: E402  (the same memory sampling as the 2D benchmark)

SHAPE, SPACING, PATCH = (256, 256, 128), (1.0, 1.0, 1.5), 96


def generate(root: Path, n: int) -> Path:
    import nibabel as nib
    import numpy as np

    folder = root / str(n)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in SHAPE), indexing="ij")
    affine = np.diag([*SPACING, 1.0])
    for i in range(n):
        image_path = folder / "images" / f"case_{i:03d}.nii.gz"
        if image_path.is_file() and (folder / "masks" / f"case_{i:03d}.nii.gz").is_file():
            continue
        c = rng.uniform(-0.3, 0.3, 3)
        body = (x**2 + y**2 < 0.8).astype(np.float32) * 300 - 1000
        organ = ((x - c[0]) ** 2 / 0.09 + (y - c[1]) ** 2 / 0.06 + (z - c[2]) ** 2 / 0.2) < 1
        image = body + organ * 350 + rng.normal(0, 20, SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(image_path))
        nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), str(folder / "masks" / f"case_{i:03d}.nii.gz"))
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{n} volumes written", flush=True)
    return folder


def job(folder: Path, cache: str, cache_dir: Path):
    from medfed.config import parse_job

    return parse_job({
        "name": "stream3d", "output": str(folder.parent / "run"), "rounds": 1, "seed": 0,
        "model": {"name": "unet", "width": 8}, "task": {"kind": "segmentation", "num_classes": 2, "hd95": False},
        "train": {"local_epochs": 1, "batch_size": 2, "lr": 0.01, "optimizer": "adam"},
        "transforms": {"preprocess": [{"name": "spacing", "pixdim": [1.5, 1.5, 1.5]}, {"name": "normalize"}],
                       "patch": [PATCH] * 3},
        "data": {"source": "volumes", "cache": cache, "cache_dir": str(cache_dir),
                 "loader": {"workers": 2, "prefetch": 2},
                 "sites": [{"name": "h", "images": str(folder / "images"), "masks": str(folder / "masks")}]},
    })


def child(folder: Path, cache: str, cache_dir: Path, epochs: int, evaluate: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from medfed.algorithms.base import SiteHook
    from medfed.core.types import TrainSettings
    from medfed.data.sites import build_sites
    from medfed.models import build_model
    from medfed.site.app import build_site_augment
    from medfed.site.evaluate import evaluate_split
    from medfed.site.train import train_local
    from medfed.tasks import build_task

    j = job(folder, cache, cache_dir)
    t = time.perf_counter()
    (site,) = build_sites(j)
    build_s = time.perf_counter() - t
    task = build_task(j)
    model = build_model(j.model, j.task, 1, spatial_dims=3)
    augment = build_site_augment(j, 3)
    settings = TrainSettings(local_epochs=1, batch_size=2, lr=0.01, optimizer="adam", momentum=0.0,
                             weight_decay=0.0, seed=0)
    epoch_s = []
    for e in range(epochs):
        t = time.perf_counter()
        train_local(model, site.train, task, settings, SiteHook(), torch.device("cpu"), augment=augment)
        epoch_s.append(time.perf_counter() - t)
    out = {"train": len(site.train), "shape": list(site.train.shape), "build_s": build_s, "epoch_s": epoch_s}
    if evaluate:
        val = site.val.subset(torch.arange(min(evaluate, len(site.val))))
        t = time.perf_counter()
        metrics = evaluate_split(model, val, task, torch.device("cpu"), distances=False)
        out.update(eval_volumes=len(val), eval_s=time.perf_counter() - t, dice=metrics["dice"])
    # what preprocessing alone costs: read + resample + normalize every training volume, one process
    pipeline = site.train.store.pipeline if hasattr(site.train, "store") else None
    if pipeline is not None:
        t = time.perf_counter()
        for entry in site.train.entries[:10]:
            pipeline(entry)
        out["preprocess_s_per_volume"] = (time.perf_counter() - t) / min(10, len(site.train.entries))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["gen", "run", "child"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/stream3d"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--cache", default="disk")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--evaluate", type=int, default=4, help="val volumes evaluated with the sliding window")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    folder = args.root / str(args.n)
    if args.command == "gen":
        generate(args.root, args.n)
    elif args.command == "child":
        print(json.dumps(child(folder, args.cache, args.cache_dir, args.epochs, args.evaluate)))
    else:
        import tempfile

        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            r = measure_child(__file__, ["--root", str(args.root), "--n", str(args.n), "--cache", args.cache,
                                         "--epochs", str(args.epochs), "--evaluate", str(args.evaluate),
                                         "--cache-dir", tmp])
        print(json.dumps(r, indent=1))
        print(f"\n| cache | train volumes | shape | epoch 1 s | epoch 2 s | preprocess s/volume (1 process) | "
              f"sliding-window eval s/volume | peak PSS MiB | peak RSS MiB |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n"
              f"| {args.cache} | {r['train']} | {'x'.join(map(str, r['shape'][1:]))} | {r['epoch_s'][0]:.0f} | "
              f"{r['epoch_s'][1]:.0f} | {r.get('preprocess_s_per_volume', float('nan')):.2f} | "
              f"{r['eval_s'] / r['eval_volumes']:.1f} | {r['peak_pss_mib']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
