"""Loading throughput of the readers, with and without the preprocessing pipeline, and
the time of one federated segmentation round (2D and 3D).

Usage: python benchmarks/loading.py [--repeats 3] [--skip-rounds]

Data is generated in a temporary folder (nothing is downloaded):
  png     300 grey 256x256 PNG files with a CSV of labels (folder source);
          preprocessing: resize to 64x64, z-score.
  dicom   a 64-slice series made from pydicom's CT_small.dcm (128x128, positions
          moved slice by slice), read as one volume; and the 64 files read one by one;
          preprocessing: CT window preset ct_abdomen, crop_or_pad to 64x96x96.
  nifti   20 volumes 128x128x64 (.nii.gz, spacing 1x1x2 mm) with label volumes;
          preprocessing: resample to 2x2x2 mm, z-score, crop_or_pad 64x64x32.
Throughput is items per second over the whole read (best of ``repeats``).

Round time: a synthetic segmentation job (3 sites; 2D: 96 training images of 64x64,
UNet width 8; 3D: 24 training volumes of 32^3 with 16^3 patches and sliding-window
evaluation, UNet width 8) run for 3 rounds; a round's time is the gap between the ends
of consecutive rounds (training, aggregation and evaluation of every site), median of
rounds 2 and 3.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def best_rate(fn, n_items: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_items / min(times)


def make_png(folder: Path, n: int = 300) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(folder / "img" / f"{i:04d}.png")
            w.writerow([f"{i:04d}.png", i % 2])
    return folder


def make_dicom_series(folder: Path, n: int = 64) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    x0, y0, z0 = (float(v) for v in src.ImagePositionPatient)
    for i in range(n):
        ds = src.copy()
        ds.ImagePositionPatient = [x0, y0, z0 + 2.5 * i]
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"slice{i:03d}.dcm")
    return folder


def make_nifti(folder: Path, n: int = 20) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    (folder / "msk").mkdir()
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(n):
        vol = rng.normal(100, 20, (128, 128, 64)).astype(np.float32)
        mask = np.zeros((128, 128, 64), np.uint8)
        mask[40:90, 40:90, 20:40] = 1
        nib.save(nib.Nifti1Image(vol, aff), str(folder / "img" / f"case{i:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, aff), str(folder / "msk" / f"case{i:02d}.nii.gz"))
    return folder


def loading(repeats: int) -> list[tuple[str, str, float, str]]:
    from medfed.config import FolderData, TaskConfig, VolumesData
    from medfed.config import TransformsConfig as T
    from medfed.data.readers.folder import read_folder
    from medfed.data.readers.volumes import load_dicom, load_dicom_series, read_volume_sites
    from medfed.data.transforms import build_preprocess

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="medfed-loading-"))
    try:
        png = make_png(tmp / "png")
        cfg = FolderData(source="folder", sites=[{"name": "a", "images": png / "img", "csv": png / "labels.csv"}],
                         label_columns=["label"])
        task = TaskConfig(labels="binary")
        pre = build_preprocess(T(preprocess=[{"name": "resize", "size": [64, 64]}, {"name": "normalize"}]).preprocess,
                               2, False)
        rows.append(("PNG 256x256, folder + CSV", "read", best_rate(lambda: read_folder(cfg, task), 300, repeats), "images/s"))
        rows.append(("PNG 256x256, folder + CSV", "read + resize 64 + z-score",
                     best_rate(lambda: [pre(r) for r in read_folder(cfg, task)[0].records], 300, repeats), "images/s"))

        series = make_dicom_series(tmp / "dicom" / "series")
        files = sorted(series.iterdir())
        pre3 = build_preprocess(T(preprocess=[{"name": "window", "preset": "ct_abdomen"},
                                              {"name": "crop_or_pad", "size": [64, 96, 96]}]).preprocess, 3, False)
        from medfed.data.base import Record

        def series_with_pre():
            v = load_dicom_series(series, "a")
            pre3(Record("s", v.array[None], np.zeros((), np.int64), v.spacing))

        rows.append(("DICOM CT 128x128, 64 files", "read each file", best_rate(lambda: [load_dicom(f, "a") for f in files], 64, repeats), "files/s"))
        rows.append(("DICOM CT 128x128, 64 files", "read as one series", best_rate(lambda: load_dicom_series(series, "a"), 64, repeats), "slices/s"))
        rows.append(("DICOM CT 128x128, 64 files", "series + window + crop_or_pad", best_rate(series_with_pre, 64, repeats), "slices/s"))

        nii = make_nifti(tmp / "nifti")
        vcfg = VolumesData(source="volumes", sites=[{"name": "a", "images": nii / "img", "masks": nii / "msk"}])
        prev = build_preprocess(T(preprocess=[{"name": "spacing", "pixdim": [2, 2, 2]}, {"name": "normalize"},
                                              {"name": "crop_or_pad", "size": [64, 64, 32]}]).preprocess, 3, True)
        rows.append(("NIfTI 128x128x64 .nii.gz + mask", "read", best_rate(lambda: read_volume_sites(vcfg, 2), 20, repeats), "volumes/s"))
        rows.append(("NIfTI 128x128x64 .nii.gz + mask", "read + resample 2 mm + z-score + crop",
                     best_rate(lambda: [prev(r) for r in read_volume_sites(vcfg, 2)[0].records], 20, repeats), "volumes/s"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def round_time(dims: int) -> tuple[float, float]:
    from medfed.config import parse_job
    from medfed.server.runner import run_job

    size, n_train, patch = (64, 96, None) if dims == 2 else (32, 24, [16, 16, 16])
    sites = [{"name": f"s{i}", "n_train": n_train, "n_val": 8, "n_test": 8,
              "scanner": {"intensity_scale": 1.0 + 0.2 * i, "noise": 0.02}} for i in range(3)]
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        job = parse_job({
            "name": f"seg{dims}d", "output": out + "/run", "rounds": 3, "threads": 2,
            "data": {"source": "synthetic_segmentation", "dims": dims, "image_size": size, "sites": sites},
            "model": {"name": "unet", "width": 8}, "task": {"kind": "segmentation", "num_classes": 3, "save_predictions": 0},
            "train": {"batch_size": 8, "lr": 0.01, "optimizer": "adam"},
            **({"transforms": {"patch": patch}} if patch else {}),
        })
        t0 = time.perf_counter()
        run_job(job, on_round=lambda s, p: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps), total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-rounds", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    print("| data | what | throughput |\n| --- | --- | --- |")
    for data, what, rate, unit in loading(args.repeats):
        print(f"| {data} | {what} | {rate:.1f} {unit} |", flush=True)
    if not args.skip_rounds:
        print("\n| segmentation job | one round (s) | whole run of 3 rounds (s) |\n| --- | --- | --- |")
        for dims in (2, 3):
            r, total = round_time(dims)
            print(f"| {dims}D synthetic, 3 sites, UNet width 8 | {r:.2f} | {total:.1f} |", flush=True)


if __name__ == "__main__":
    main()
