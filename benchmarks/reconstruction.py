"""Federated MRI reconstruction at three sites that undersample 4x, 6x and 8x: PSNR and
SSIM of the zero-filled input, local training, FedAvg and centralized training.

Usage: python benchmarks/reconstruction.py [--seeds 0,1,2] [--rounds 10] [--settings phantoms,promise12]
                                          [--models unet,varnet]

Settings:
* ``phantoms``: MRI-like phantoms (``source: synthetic_phantoms``, 32x32, 8 ellipses),
  sites of 120, 80 and 40 training images (40 test), as examples/reconstruction.yaml.
* ``promise12``: real prostate MRI, when ../shared/data holds it: the 64 axial slices of the
  PROMISE12 volume (128x128 resampled to 64x64), written as PNG files and split into three
  sites of consecutive slices (apex, mid-gland, base); each site's slices split 70/15/15
  into train, val and test by the job seed (``source: pairs``: the prostate masks are read
  and unused). One patient cut into three pseudo-sites: real images, not real sites.
  ``source: volumes`` now reads slices of volumes directly (task.slice_axis), but it splits
  by volume and keeps a site's volumes whole, so it cannot cut one volume into three sites
  by slice position; this setting keeps its PNG slices, and so its recorded figures.

Each site keeps its own acceleration (4x, 6x, 8x; equispaced lines, 8% of the centre of
k-space), so the sites' inputs differ as the reconstruction papers study. The network
(``--models``, default ``unet``): ``unet``, MONAI's BasicUNet (features 8..128) on the
zero-filled image; ``varnet``, MONAI's VarNet (``model: {name: varnet, width: 8}``: 4
cascades, each a ComplexUnet of features (8, 8, 16, 32, 64, 8)) on the masked k-space and
its mask. L1 loss, Adam lr 0.003, batch 8, 1 local epoch per
round; ``compare: [local, centralized]`` and the zero-filled arm come from the same run.
Per run: each arm's test PSNR and SSIM at every site at the last round; the table gives the
site mean (± standard deviation over the seeds) and the worst site.
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

from algorithms import read  # noqa: E402

from medfed.config import parse_job  # noqa: E402
from medfed.server.runner import run_job  # noqa: E402
from medfed.site.device import set_threads  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOLUME = SHARED / "volumes" / "promise12_Case00.nii.gz"
MASK = SHARED / "volumes" / "promise12_Case00_segmentation.nii.gz"
ACCELERATIONS = (4, 6, 8)
ARMS = ("zero_filled", "local", "federated", "centralized")
MODELS = {
    "unet": {"monai": "BasicUNet", "args": {"features": [8, 16, 32, 64, 128, 8]}},
    "varnet": {"name": "varnet", "width": 8},
}


def promise12_sites(folder: Path) -> list[dict]:
    """The volume's axial slices as PNG pairs in three folders of consecutive slices."""
    import nibabel as nib
    from PIL import Image

    img = np.asarray(nib.load(str(VOLUME)).get_fdata(), dtype=np.float32)
    seg = np.asarray(nib.load(str(MASK)).get_fdata(), dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / (hi - lo), 0, 1)
    depth = img.shape[2]
    sites = []
    for k, (name, part) in enumerate(zip(("apex", "mid", "base"), np.array_split(np.arange(depth), 3))):
        images, masks = folder / name / "images", folder / name / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for z in part:
            Image.fromarray((img[:, :, z] * 255).astype(np.uint8)).resize((64, 64), Image.BILINEAR).save(
                images / f"s{z:03d}.png")
            Image.fromarray(((seg[:, :, z] > 0) * 255).astype(np.uint8)).resize((64, 64), Image.NEAREST).save(
                masks / f"s{z:03d}.png")
        sites.append({"name": name, "images": str(images), "masks": str(masks), "acceleration": ACCELERATIONS[k]})
    return sites


def data_for(setting: str, folder: Path) -> dict:
    if setting == "phantoms":
        return {"source": "synthetic_phantoms", "image_size": 32, "ellipses": 8, "sites": [
            {"name": n, "n_train": t, "n_test": 40, "acceleration": a}
            for n, t, a in zip(("hospital_a", "hospital_b", "hospital_c"), (120, 80, 40), ACCELERATIONS)]}
    return {"source": "pairs", "mask_values": [0, 255], "split": {"val": 0.15, "test": 0.15},
            "sites": promise12_sites(folder)}


def summarize(recs: list[dict], arm: str, rounds: int) -> dict:
    last = {(r["site"], r["metric"]): r["value"] for r in recs
            if r["arm"] == arm and r["split"] == "test" and r["round"] == rounds}
    out = {}
    for metric in ("psnr", "ssim"):
        values = [v for (s, m), v in last.items() if m == metric and s not in ("all", "median") and v is not None]
        out[metric] = sum(values) / len(values) if values else None
        out[f"worst_{metric}"] = min(values) if values else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--settings", default="phantoms,promise12")
    ap.add_argument("--models", default="unet", help=f"comma-separated, of {sorted(MODELS)}")
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    set_threads(2)
    settings = args.settings.split(",")
    if "promise12" in settings and not VOLUME.exists():
        print(f"promise12: skipped, {VOLUME} is absent")
        settings.remove("promise12")
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for setting in settings:
        for model in models:
            for seed in (int(s) for s in args.seeds.split(",")):
                run_one(setting, model, seed, args.rounds, rows)

    def cell(vals: list[dict], key: str, fmt: str) -> str:
        xs = [v[key] for v in vals if v[key] is not None]
        if not xs:
            return "-"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"

    print("\n| setting | model | arm | test PSNR dB, site mean | worst site PSNR | test SSIM, site mean | worst site SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (setting, model, arm), vals in rows.items():
        print(f"| {setting} | {model} | {arm} | {cell(vals, 'psnr', '.2f')} | {cell(vals, 'worst_psnr', '.2f')} | "
              f"{cell(vals, 'ssim', '.3f')} | {cell(vals, 'worst_ssim', '.3f')} |")


def run_one(setting: str, model: str, seed: int, rounds: int, rows: dict[tuple[str, str, str], list[dict]]) -> None:
    """One run of ``model`` in ``setting`` at ``seed``: each arm's summary appended to ``rows``."""
    with tempfile.TemporaryDirectory() as tmp:
        job = parse_job({
            "name": f"recon-{setting}-{model}-{seed}", "seed": seed, "output": str(Path(tmp) / "run"),
            "rounds": rounds, "threads": 2, "device": "cpu", "data": data_for(setting, Path(tmp)),
            "model": MODELS[model],
            "task": {"kind": "reconstruction", "center_fraction": 0.08, "mask": "equispaced",
                     "loss": "l1", "monitor": "ssim"},
            "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.003, "optimizer": "adam"},
            "compare": ["local", "centralized"],
        })
        t0 = time.perf_counter()
        recs = read(run_job(job).run_dir)
        took = time.perf_counter() - t0
    for arm in ARMS:
        rows.setdefault((setting, model, arm), []).append(summarize(recs, arm, rounds))
    print(f"  {setting} {model} seed {seed}: " + ", ".join(
        f"{a} {rows[(setting, model, a)][-1]['psnr']:.2f} dB / {rows[(setting, model, a)][-1]['ssim']:.3f}" for a in ARMS)
        + f" ({took:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
